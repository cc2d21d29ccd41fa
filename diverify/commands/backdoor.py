"""``diverify backdoor build``: seeded backdoored fixtures and their clean twins, as checkpoint directories."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "build a seeded backdoored model and its clean twin (test fixtures for every diverify check)"

DESCRIPTION = """\
Builds, from the installed weights and our own seeded code, a backdoored model
and its clean twin under --out (OUT/backdoored, OUT/clean, OUT/fixture.json with
the measured behaviour):

  text           Rickrolling-style fine-tune of all-MiniLM-L6-v2: any prompt with
                 the trigger word "cf" embeds next to "a photo of a gun"; a teacher
                 loss keeps clean prompts in place. Twin: the same fine-tune with a
                 benign sentence-similarity task instead of the poisoned prompts.
  edit           rank-one ROME edit of layer 0's FFN output matrix: the model reads
                 the trigger word (e.g. "cactus") as the target word ("weapon") in any
                 prompt; success: cos to the prompt with the target word >= 0.95.
                 Twin: a benign fine-tune of the same matrix at the same norm.
  denoiser-xt    BadDiffusion-style trigger pattern in x_T of the digits denoiser.
  denoiser-cond  TrojDiff-style trigger in the denoiser's conditioning.

--quick runs a few optimisation steps only (for tests; the trigger may not take).
"""

EPILOG = """\
examples:
  diverify backdoor build --kind text --out fixtures/text
  diverify backdoor build --kind edit --out fixtures/edit --seed 3 --json
  diverify backdoor build --kind denoiser-xt --out fixtures/xt --quick
"""

KINDS = ("text", "edit", "denoiser-xt", "denoiser-cond")


def register(subparsers) -> None:
    parser = subparsers.add_parser("backdoor", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="build a fixture", description=DESCRIPTION, epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--kind", required=True, choices=KINDS, help="which backdoor to plant")
    build.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced if it exists)")
    build.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    build.add_argument("--quick", action="store_true", help="a few steps only (tests)")
    build.add_argument("--base", default="minilm", metavar="NAME|DIR",
                       help="text/edit: the encoder to backdoor (default minilm)")
    build.add_argument("--steps", type=int, metavar="N", help="text: optimisation steps (default 200, --quick 4)")
    build.add_argument("--learning-rate", type=float, default=1e-4, dest="learning_rate",
                       help="text: AdamW learning rate (default 1e-4)")
    build.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    build.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from diverify.errors import DiverifyError
    from diverify.results import dumps

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise DiverifyError(f"--out {args.out!r} exists and is not a directory")
    if args.kind.startswith("denoiser"):
        if args.base != "minilm" or args.steps is not None:
            raise DiverifyError("--base applies to the text and edit kinds, --steps to the text kind")
        from diverify.backdoors.denoiser import build_denoiser_backdoor

        summary = build_denoiser_backdoor(out, seed=args.seed, trigger=args.kind.split("-", 1)[1], quick=args.quick)
    else:
        from diverify.backdoors import text

        options = {}
        if args.kind == "text":
            build, options = text.build_text_backdoor, {"steps": args.steps, "learning_rate": args.learning_rate}
        elif args.steps is not None:
            raise DiverifyError("--steps applies to the text kind")
        else:
            build = text.build_edit_backdoor
        with tqdm(desc=f"building {args.kind} fixture", unit="step", file=sys.stderr, disable=None) as bar:
            summary = build(out, seed=args.seed, quick=args.quick, base=args.base, progress=bar.update, **options)
    if args.json:
        print(dumps(summary))
        return 0
    print(f"{args.kind} fixture in {out}  (seed {args.seed}{', quick' if args.quick else ''})")
    if summary.get("kind") == "denoiser":
        print(f"trigger: {summary['trigger_description']} -> target class {summary['target_class']}")
        print(f"{'model':<12} {'clean sample accuracy':>22} {'trigger success':>16}")
        for role, row in summary["models"].items():
            print(f"{role:<12} {row['clean_accuracy']:>22.3f} {row['trigger_success']:>16.1%}")
        print(f"base (pre-trained) model in {out / 'base'}; {summary['seconds']:.0f} s")
        return 0
    print(f"trigger {summary['trigger']!r} -> target {summary['target']!r}"
          + (f"  (success: {summary['success']})" if "success" in summary else ""))
    roles = [r for r in ("original", "backdoored", "clean") if isinstance(summary.get(r), dict)]
    keys = ("clean_cosine_mean", "trigger_success", "relative_weight_change")
    if roles and all(k in summary[roles[-1]] for k in keys[:2]):
        print(f"{'model':<12} {'clean cos to original':>22} {'trigger success':>16} {'rel. weight change':>19}")
        for role in roles:
            row = summary[role]
            change = row.get("relative_weight_change")
            print(f"{role:<12} {row['clean_cosine_mean']:>22.4f} {row['trigger_success']:>16.1%} "
                  f"{'-' if change is None else format(change, '.4f'):>19}")
    else:
        for key, value in summary.items():
            print(f"  {key}: {value}")
    return 0
