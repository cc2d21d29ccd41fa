"""``diverify train-denoiser``: train the class-conditional digits denoiser and its classifier."""

from __future__ import annotations

import argparse

from diverify.errors import DiverifyError

DEFAULT_STEPS = 3000

EPILOG = """\
example:
  diverify train-denoiser --dataset digits --out runs/digits --steps 3000
  diverify train-denoiser --dataset digits --out /tmp/quick --steps 200 --json

Writes DIR/config.json + DIR/diffusion_pytorch_model.safetensors (a diffusers
UNet2DModel, loadable with diffusers' UNet2DModel.from_pretrained),
DIR/scheduler_config.json (DDPM, 1000 linear betas) and DIR/classifier.json
(logistic regression on the 8x8 pixels). It then samples each digit with DDIM
and reports how often the classifier recognises the requested class.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-denoiser",
        help="train a small class-conditional diffusion UNet (diffusers format) on a built-in dataset",
        description="Train a class-conditional UNet2DModel with optax on scikit-learn's 8x8 digits, save it in "
                    "diffusers format next to a digits classifier, and report the class accuracy of its samples.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", choices=["digits"], default="digits", help="training data (default: digits)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"AdamW training steps (default: {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--samples-per-class", type=int, default=20,
                        help="DDIM samples per digit for the accuracy check (default: 20)")
    parser.add_argument("--ddim-steps", type=int, default=25, help="DDIM steps for the samples (default: 25)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from diverify.diffusion.digits import train_and_save
    from diverify.results import dumps

    if args.steps < 1:
        raise DiverifyError(f"--steps must be positive, got {args.steps}")
    if args.samples_per_class < 1:
        raise DiverifyError(f"--samples-per-class must be positive, got {args.samples_per_class}")
    result = train_and_save(args.out, args.steps, seed=args.seed, samples_per_class=args.samples_per_class,
                            ddim_steps=args.ddim_steps, log_every=0 if args.json else max(1, args.steps // 10))
    if args.json:
        print(dumps(result))
        return 0
    rows = [
        ("output", result.out),
        ("training steps", str(result.steps)),
        ("training time", f"{result.train_seconds:.1f} s"),
        ("parameters", str(result.num_parameters)),
        ("loss (first -> last)", f"{result.loss_first:.4f} -> {result.loss_last:.4f}"),
        ("classifier test accuracy", f"{result.classifier_test_accuracy:.3f}"),
        (f"sample accuracy (DDIM {result.ddim_steps}, {result.samples_per_class}/class)",
         f"{result.sample_accuracy:.3f}"),
        ("per class", " ".join(f"{a:.2f}" for a in result.per_class_accuracy)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
