"""``diverify certify-edit``: formal bounds over weight edits (no edit in the ball creates a latent collision)."""

from __future__ import annotations

import argparse

HELP = "prove that no edit of chosen weight matrices inside a ball creates a latent collision"

DESCRIPTION = """\
Parameter-level verification, the deterministic counterpart of `diverify cws`.
The bound engine treats the edits D of the matrices selected by --params as
perturbed inputs and bounds cos(emb_{theta+D}(prompt), emb(concept)) over every
edit in the ball (per matrix): --ball inf (max |D_ij| <= R), fro (||D||_F <= R),
or rank1 ({u v^T : ||u|| ||v|| <= R}, the shape of ROME / EvilEdit edits, bounded
over its convex hull, the nuclear-norm ball). Concepts are embedded with the clean
weights. A concept is certified when the upper bound is below --threshold; a
collision when a gradient attack on the edit reaches it; unknown otherwise.

With one selected matrix the edit enters as the exact move x D of that layer's
output ("image" formulation, L*n coordinates); with several, as the weights
themselves. --search bisects for the largest certified radius in [0, R] and the
smallest radius at which the attack finds a collision, logging every bound to
stderr; --max-seconds caps its wall time. --edit-trigger adds the
norms of a ROME-style rank-one edit that makes the trigger look like the first
restricted concept, to compare with the radius.
"""

EPILOG = """\
examples:
  diverify certify-edit --layers 1 --params encoder/layer_0/attention/self/value/kernel --ball rank1 \\
      --radius 1e-3 --prompt "a photo of a cf cat" --restricted "a red car" --threshold 0.5
  diverify certify-edit --layers 1 --params encoder/layer_0/attention/self/value/kernel --ball fro \\
      --radius 0.01 --search --prompt "a photo of a cf cat" --restricted "a red car" \\
      --threshold 0.5 --edit-trigger cf --json
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("certify-edit", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", metavar="NAME|DIR",
                        help="'minilm' (all-MiniLM-L6-v2, the default) or a Hugging Face checkpoint directory")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt (with the trigger, if any) to certify")
    src.add_argument("--ids", metavar="ID,ID,...", help="the prompt as token ids (bypasses the tokenizer)")
    parser.add_argument("--params", required=True, metavar="PATTERN",
                        help="comma-separated globs over parameter paths, or re:REGEX, selecting Dense kernels")
    parser.add_argument("--ball", choices=("rank1", "fro", "inf"), default="rank1",
                        help="the edit set per matrix (default rank1)")
    parser.add_argument("--radius", type=float, required=True, metavar="R",
                        help="radius of the ball (with --search: the upper end of the search)")
    parser.add_argument("--restricted", nargs="+", required=True, metavar="TEXT", help="restricted concepts")
    parser.add_argument("--threshold", type=float, default=0.8, metavar="TAU",
                        help="collision when the cosine is >= TAU (default 0.8)")
    parser.add_argument("--layers", type=int, metavar="N", help="truncate the encoder to its first N layers")
    parser.add_argument("--method", default="crown-forward",
                        help="bound method (default crown-forward; crown is tighter and slower)")
    parser.add_argument("--formulation", choices=("auto", "image", "weights"), default="auto",
                        help="image (one matrix: bound over the layer's output move) or weights (default auto)")
    parser.add_argument("--search", action="store_true", help="bisect for the largest certified radius")
    parser.add_argument("--steps", type=int, default=10, help="bisection steps (default 10)")
    parser.add_argument("--max-seconds", type=float, dest="max_seconds", metavar="S",
                        help="with --search: stop bisecting after S seconds of wall time and report the bracket "
                             "reached (the certified radius found so far stays sound)")
    parser.add_argument("--edit-trigger", dest="edit_trigger", metavar="TOKEN",
                        help="report the norms of a ROME-style edit of the selected matrix for this trigger")
    parser.add_argument("--no-attack", action="store_true", dest="no_attack",
                        help="skip the gradient attack on the edit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attack's starting points")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    parser.set_defaults(func=handler)


def handler(args) -> int:
    import sys
    import time

    import numpy as np

    from diverify import cmav, edit_bounds
    from diverify.commands._cmav_args import parse_int_list
    from diverify.errors import DiverifyError
    from diverify.models import load_text_encoder
    from diverify.results import dumps, to_jsonable

    edit_bounds.ball_norm(args.ball)
    if args.steps < 1:
        raise DiverifyError(f"--steps must be at least 1, got {args.steps}")
    enc = load_text_encoder(args.model)
    if args.layers is not None:
        enc = enc.with_layers(args.layers)
    paths = edit_bounds.select_kernels(enc, args.params)
    if args.edit_trigger and (len(paths) != 1 or args.prompt is None):
        raise DiverifyError("--edit-trigger needs a text --prompt and --params selecting exactly one matrix")
    ids = parse_int_list(args.ids, "--ids") if args.ids else None
    prompt = cmav.make_prompt(enc, text=args.prompt, ids=ids)
    attack = not args.no_attack
    if args.search:
        # One stderr line per bound / attack (also with --json, whose output is stdout): the first
        # compilation of a real model takes minutes and must not look like a hang.
        start = time.perf_counter()
        result = edit_bounds.certified_edit_radius(
            enc, prompt, args.params, args.ball, args.restricted, args.threshold, args.radius,
            method=args.method, formulation=args.formulation, steps=args.steps, attack=attack, seed=args.seed,
            max_seconds=args.max_seconds,
            progress=lambda message: print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr,
                                           flush=True))
    else:
        result = edit_bounds.certify_edit(enc, prompt, args.params, args.ball, args.radius, args.restricted,
                                          args.threshold, method=args.method, formulation=args.formulation,
                                          attack=attack, seed=args.seed)
    report = to_jsonable(result)
    if args.edit_trigger:
        from diverify.cws.certificate import rome_style_edit

        edit = rome_style_edit(enc, paths[0], args.prompt, args.edit_trigger, args.restricted[0])
        norms = edit_bounds.edit_norms(np.asarray(edit.delta))
        radius = result.certified_radius if args.search else (args.radius if result.certified else 0.0)
        report["rome_edit"] = {"norms": norms, "covered": bool(norms[args.ball] <= radius)}
    if args.json:
        print(dumps(report))
        return 0
    print(f"model {result.model}  ball {args.ball}  formulation {result.formulation}  method {result.method}")
    print(f"edited: {', '.join(result.params)}")
    if args.search:
        attack_text = "none found up to --radius" if result.attack_radius is None else f"{result.attack_radius:.4g}"
        upper = "" if result.not_certified_radius is None else f", not certified at {result.not_certified_radius:.4g}"
        print(f"certified radius  {result.certified_radius:.4g}{upper}   (threshold {result.threshold})"
              + ("   [stopped early: --max-seconds]" if result.stopped_early else ""))
        print(f"attack radius     {attack_text}")
        print(f"{result.seconds:.1f} s ({result.compile_seconds:.1f} s compilation)")
    else:
        print(f"radius {result.radius:g}: {'CERTIFIED' if result.certified else 'not certified'}   "
              f"({result.seconds:.2f} s bound, {result.compile_seconds:.1f} s tracing + compilation)")
        width = max(len(v.concept) for v in result.concepts)
        for v in result.concepts:
            attack_text = "" if not np.isfinite(v.attack_cosine) else f"  attack {v.attack_cosine:.4f}"
            upper = "none" if v.cosine_upper is None else f"{v.cosine_upper:.4f}"
            print(f"  {v.concept:<{width}}  {v.status:<9}  cos clean {v.cosine_clean:.4f}  upper {upper}{attack_text}")
            print(f"  {'':<{width}}  reason: {v.reason}")
    if args.edit_trigger:
        n = report["rome_edit"]["norms"]
        print(f"ROME-style edit for {args.edit_trigger!r}: inf {n['inf']:.4g}  fro {n['fro']:.4g}  "
              f"rank1 (nuclear) {n['rank1']:.4g}  -> {'covered' if report['rome_edit']['covered'] else 'not covered'}")
    return 0
