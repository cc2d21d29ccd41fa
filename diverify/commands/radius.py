"""``diverify radius``: the certified radius and the attack radius of a prompt against restricted concepts."""

from __future__ import annotations

import argparse

from diverify.commands import _cmav_args as common

EPILOG = """\
example:
  diverify radius --prompt "a photo of a cat" --positions 4 --restricted "a photo of a dog" --threshold 0.8

The true robust radius lies between the certified radius (every concept proved
below the threshold) and the attack radius (a collision found by PGD).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "radius", help="largest certified eps and smallest attacked eps for a prompt",
        description="Bisection for the largest l_p radius at which every restricted concept is certified, and "
                    "for the smallest radius at which PGD finds a collision.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_prompt_options(parser)
    common.add_ball_options(parser, eps_required=False)
    common.add_precision_option(parser)
    common.add_symbols_option(parser)
    common.add_refine_option(parser)
    parser.add_argument("--restricted", nargs="+", required=True, metavar="TEXT")
    parser.add_argument("--threshold", type=float, required=True, metavar="TAU")
    parser.add_argument("--eps-max", type=float, default=0.1, help="upper end of the search (default 0.1)")
    parser.add_argument("--steps", type=int, default=12, help="bisection steps (default 12)")
    parser.set_defaults(func=handler)


def handler(args) -> int:
    from tqdm import tqdm

    from diverify import cmav
    from diverify.results import dumps

    common.check_eps(args.eps_max)
    common.check_symbols(args.symbols)
    enc, prompt = common.load(args)
    pos = common.positions(args, prompt)
    with tqdm(total=args.steps, desc="bisection", disable=args.json, leave=False) as bar:
        res = cmav.certified_radius(enc, prompt, pos, args.restricted, args.threshold,
                                    norm=common.norm_value(args.norm), method=args.method,
                                    eps_max=args.eps_max, steps=args.steps, progress=lambda n: bar.update(1),
                                    precision=args.precision, symbols=args.symbols,
                                    refine=args.refine)
    if args.json:
        print(dumps(res))
        return 0
    attack = "none found up to --eps-max" if res.attack_radius is None else f"{res.attack_radius:.4g}"
    print(f"model {res.model}  positions {res.positions}  l_{res.norm}  threshold {res.threshold}  method {res.method} ({res.precision})")
    print(f"certified radius  {res.certified_radius:.4g}")
    print(f"attack radius     {attack}")
    if res.ratio is not None:
        print(f"tightness (certified / attack) {res.ratio:.3f}")
    print(f"{res.seconds:.1f} s")
    return 0
