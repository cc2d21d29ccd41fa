"""``diverify bounds``: sound bounds on a text encoder's pooled embedding over an embedding ball."""

from __future__ import annotations

import argparse

from diverify.commands import _cmav_args as common

EPILOG = """\
examples:
  diverify bounds --ids 101,1037,6302,1997,1037,4937,102 --positions 5 --eps 1e-4
  diverify bounds --prompt "a photo of a cat" --positions 4 --norm 2 --eps 1e-3 --method alpha-crown --json
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bounds", help="bound the pooled (un-normalised) embedding over an l_p ball of word embeddings",
        description="Sound lower/upper bounds on every coordinate of the checkpoint's pooled embedding "
                    "(before Normalize) when the word embeddings at --positions move in an l_p ball of radius --eps.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_prompt_options(parser)
    common.add_ball_options(parser)
    common.add_precision_option(parser)
    common.add_symbols_option(parser)
    common.add_refine_option(parser)
    parser.set_defaults(func=handler)


def handler(args) -> int:
    import time

    import jax
    import numpy as np

    from diverify import cmav
    from diverify.bounds import compile_bounds
    from diverify.results import dumps

    eps = common.check_eps(args.eps)
    common.check_symbols(args.symbols)
    enc, prompt = common.load(args)
    pos = common.positions(args, prompt)
    ball = cmav.embedding_ball(enc, prompt, pos, eps, common.norm_value(args.norm))
    fn = cmav.pooled_function(enc, prompt)
    t0 = time.perf_counter()
    bf = compile_bounds(fn, ball, method=args.method, precision=args.precision, symbols=args.symbols,
                        refine=args.refine)
    trace_seconds = time.perf_counter() - t0
    res, compile_seconds, seconds = bf.timed(ball)
    lower, upper = np.asarray(res.output.lower), np.asarray(res.output.upper)
    center = np.asarray(jax.jit(fn)(ball.center))  # one compilation, not one per operation
    out = {"model": enc.name, "ids": [int(i) for i in prompt.ids[0]], "positions": pos, "norm": args.norm,
           "eps": eps, "lower": lower, "upper": upper, "center": center, "method": res.method,
           "intermediate_method": res.intermediate_method, "precision": args.precision,
           "symbols": args.symbols, "refine": args.refine, "mean_width": float(np.mean(upper - lower)),
           "max_width": float(np.max(upper - lower)), "seconds": seconds,
           "compile_seconds": trace_seconds + compile_seconds}
    if args.json:
        print(dumps(out))
        return 0
    print(f"model {enc.name}  tokens: {' '.join(prompt.tokens)}")
    print(f"perturbed positions {pos}  l_{args.norm} ball, eps = {eps:g}  method {res.method} "
          f"(intermediate bounds: {res.intermediate_method}, {args.precision})")
    print(f"{'coord':>5} {'lower':>12} {'center':>12} {'upper':>12} {'width':>10}")
    for i in range(min(8, lower.size)):
        print(f"{i:>5} {lower[i]:>12.6f} {center[i]:>12.6f} {upper[i]:>12.6f} {upper[i] - lower[i]:>10.3g}")
    if lower.size > 8:
        print(f"  ... {lower.size - 8} more coordinates (use --json for all)")
    print(f"mean width {out['mean_width']:.4g}, max width {out['max_width']:.4g};  "
          f"bound {out['seconds']:.3f} s after {out['compile_seconds']:.1f} s tracing+compilation")
    return 0
