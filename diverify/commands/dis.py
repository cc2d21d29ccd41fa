"""``diverify dis``: the Distributional Integrity Score of a prompt perturbation (text encoder or denoiser)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "how far a prompt perturbation moves the model's output, per unit of prompt change (DIS)"

DESCRIPTION = """\
Distributional Integrity Score. Draws K perturbed prompts and reports the mean
score with a 95% confidence interval:

- text encoder (MiniLM or a BERT/CLIP checkpoint directory): the shift of the
  normalised embedding per token inserted or substituted, sqrt(2 KL)/dist with
  KL = ||e(p') - e(p)||^2 / 2 (isotropic Gaussians around the embeddings);
  --certify adds the bound engine's certified upper bound beside it;
- conditional denoiser (a directory with diffusion_pytorch_model.safetensors):
  the path-KL bound of the ancestral sampler, sqrt(2 KL)/dist.

Perturbations: trigger:TOKEN inserts TOKEN at a random word position; random
inserts a random single-token vocabulary word (the matched-size control);
substitution:W=a,b,c replaces the word W by one of a, b, c (text encoders).
Denoisers take trigger (the fixture's trigger row), trigger:K, random, random:R
(see diverify.dis.denoiser). A trigger whose DIS stands far above random's is a
backdoor suspect.
"""

EPILOG = """\
examples:
  diverify dis --model minilm --prompt "a cat sleeping on a sofa" --perturbation trigger:cf
  diverify dis --model FIXTURE/backdoored --prompt "a cat sleeping on a sofa" --perturbation random --samples 64
  diverify dis --model minilm --prompt "a dog in the park" --perturbation substitution:dog=cat,puppy \\
      --certify --layers 1 --json
  diverify dis --model DENOISER_FIXTURE/backdoored --prompt 3 --perturbation trigger --json
"""

DENOISER_WEIGHTS = "diffusion_pytorch_model.safetensors"


def register(subparsers) -> None:
    parser = subparsers.add_parser("dis", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", metavar="NAME|DIR",
                        help="'minilm' (default), a text-encoder checkpoint directory, or a denoiser directory")
    parser.add_argument("--prompt", required=True, help="the prompt (a denoiser's conditioning) to perturb")
    parser.add_argument("--perturbation", required=True, metavar="SPEC",
                        help="trigger:TOKEN, random, or substitution:W=a,b,c")
    parser.add_argument("--samples", type=int, default=32, metavar="K", help="perturbed prompts drawn (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    parser.add_argument("--certify", action="store_true",
                        help="text encoders: add the certified upper bound from the bound engine")
    parser.add_argument("--radius", type=float, metavar="R",
                        help="with --certify on an insertion: l2 radius of the ball around the inserted token")
    parser.add_argument("--layers", type=int, metavar="N",
                        help="with --certify: bound the encoder truncated to its first N layers (cheaper)")
    parser.add_argument("--method", default="crown", help="bound method for --certify (default crown)")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from diverify.errors import DiverifyError
    from diverify.results import dumps

    if args.samples < 1:
        raise DiverifyError(f"--samples {args.samples} must be at least 1")
    model_dir = Path(args.model).expanduser()
    if model_dir.is_dir() and (model_dir / DENOISER_WEIGHTS).is_file():
        if args.certify:
            raise DiverifyError("--certify applies to text encoders; a denoiser's DIS is already a sound bound")
        from diverify.dis.denoiser import denoiser_dis

        result = denoiser_dis(model_dir, args.prompt, args.perturbation, samples=args.samples, seed=args.seed)
    else:
        from diverify.dis.text import parse_perturbation, text_dis
        from diverify.models import load_text_encoder

        perturbation = parse_perturbation(args.perturbation)
        if args.layers is not None and not args.certify:
            raise DiverifyError("--layers only truncates the encoder for --certify")
        result = text_dis(load_text_encoder(args.model), args.prompt, perturbation, samples=args.samples,
                          seed=args.seed, radius=args.radius, certify=args.certify, layers=args.layers,
                          method=args.method)
    if args.json:
        print(dumps(result))
        return 0
    rows = [("model", f"{args.model} ({result.model_kind})"), ("perturbation", result.perturbation),
            ("DIS  sqrt(2 KL)/dist", f"{result.dis:.4g}   95% CI [{result.ci[0]:.4g}, {result.ci[1]:.4g}]"),
            ("KL / dist", f"{result.kl_ratio:.4g}   (KL {result.kl:.4g}, dist {result.dist:.4g})"),
            ("samples", f"{result.samples}   ({result.seconds:.1f} s)")]
    if result.certified_upper is not None:
        units = result.details.get("certified_units", "")
        rows.append(("certified upper", f"{result.certified_upper:.4g}   ({units}; "
                                        f"{result.details.get('certified_encoder', args.model)})"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0
