"""``diverify certify``: latent-collision certificates (CMAV) for a prompt against restricted concepts."""

from __future__ import annotations

import argparse

from diverify.commands import _cmav_args as common
from diverify.errors import DiverifyError

EPILOG = """\
examples:
  diverify certify --prompt "a photo of a cat" --positions 4 --eps 1e-3 --restricted "a photo of a dog" --threshold 0.8
  diverify certify --prompt "a photo of a cat" --substitutions cat=dog,kitten,puppy --restricted "a gun" --threshold 0.5
  diverify certify --prompt "a photo of a cat" --words cat --eps 0.05 --norm 2 --restricted "violence" --threshold 0.6 --json
  diverify certify --prompt "a photo of a cat" --substitutions cat=cf,mn,bb --method exhaustive \\
      --restricted "a photo of a gun" --threshold 0.8

Each restricted concept gets one answer: certified (a sound upper bound on the
cosine over the whole set is below the threshold), collision (an attack found a
point of the set whose cosine reaches the threshold; the witness is printed), or
unknown (neither), each with its reason. A bound the method cannot compute on the
set (too large a perturbation, e.g. a LayerNorm variance bound reaching 0) is no
error: the concepts are unknown with the engine's message, and the attack still runs.

--method exhaustive (with --substitutions only) evaluates the model at every
combination of the token lists (at most 4096) instead of bounding their convex
hull: an exact answer for those tokens (e.g. candidate trigger words) on the
full model, where a hull bound of six layers is vacuous.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "certify", help="certify that no perturbation of the prompt collides with a restricted concept",
        description="CMAV: prove that every prompt in a perturbation set (an l_p ball on word embeddings, or "
                    "substitute words) keeps its normalised embedding's cosine with each restricted concept "
                    "below --threshold, or find a collision.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_prompt_options(parser)
    parser.add_argument("--words", nargs="+", metavar="W", help="perturb the positions of these words of the prompt")
    common.add_ball_options(parser)
    common.add_precision_option(parser)
    common.add_symbols_option(parser)
    common.add_refine_option(parser)
    parser.add_argument("--substitutions", nargs="+", metavar="W=a,b,c",
                        help="substitution set: word W of the prompt may become any of a, b, c (bound methods: "
                             "their convex hull; --method exhaustive: exactly these tokens)")
    parser.add_argument("--restricted", nargs="+", required=True, metavar="TEXT", help="restricted concepts")
    parser.add_argument("--threshold", type=float, required=True, metavar="TAU",
                        help="collision threshold on the cosine similarity")
    parser.add_argument("--no-attack", action="store_true", help="skip the attack when a concept is not certified")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=handler)


def _substitutions(enc, prompt, specs):
    from diverify import cmav

    subs = {}
    for spec in specs:
        if "=" not in spec:
            raise DiverifyError(f"--substitutions: expected W=a,b,c, got {spec!r}")
        word, alts = spec.split("=", 1)
        alternatives = [a for a in alts.split(",") if a]
        if not alternatives:
            raise DiverifyError(f"--substitutions: empty substitution list for {word!r}")
        for p in cmav.positions_of_words(enc, prompt, [word]):
            toks = []
            for a in alternatives:
                ids, _ = enc.tokenize([a])
                inner = [int(i) for i in ids[0][1:-1]]
                if len(inner) != 1:
                    raise DiverifyError(f"--substitutions: {a!r} is not a single token for this tokenizer")
                toks.append(inner[0])
            subs[p] = toks
    return subs


def handler(args) -> int:
    import numpy as np

    from diverify import cmav
    from diverify.results import dumps

    symbols = common.check_symbols(args.symbols)
    enc, prompt = common.load(args)
    args._encoder = enc
    if args.substitutions:
        if args.eps is not None:
            raise DiverifyError("give either --eps (a ball) or --substitutions, not both")
        s, table = cmav.substitution_set(enc, prompt, _substitutions(enc, prompt, args.substitutions))
    else:
        eps = common.check_eps(args.eps)
        s = cmav.embedding_ball(enc, prompt, common.positions(args, prompt), eps, common.norm_value(args.norm))
        table = None
    cert = cmav.certify(enc, prompt, s, args.restricted, args.threshold, method=args.method, table_ids=table,
                        attack=not args.no_attack, seed=args.seed, precision=args.precision,
                        symbols=symbols, refine=args.refine)
    if args.json:
        print(dumps(cert))
        return 0
    print(f"model {cert.model}  tokens: {' '.join(cert.tokens)}")
    print(f"perturbation {cert.perturbation}  method {cert.method} (intermediate: {cert.intermediate_method}, "
          f"{cert.precision})")
    print(f"{'restricted concept':<32} {'clean cos':>9} {'cos upper bound':>15} {'attack cos':>10}  verdict")
    for v in cert.concepts:
        atk = "-" if not np.isfinite(v.attack_cosine) else f"{v.attack_cosine:.4f}"
        upper = "-" if v.cosine_upper is None else f"{v.cosine_upper:.4f}"
        print(f"{v.concept[:32]:<32} {v.cosine_clean:>9.4f} {upper:>15} {atk:>10}  {v.status}")
        print(f"  reason: {v.reason}")
        if v.witness is not None:
            print(f"  witness: {_witness_text(v.witness)}")
    overall = "CERTIFIED" if cert.certified else "NOT CERTIFIED"
    print(f"{overall} at threshold {cert.threshold}  ({cert.seconds:.2f} s bound, {cert.compile_seconds:.1f} s compile)")
    return 0


def _witness_text(witness: dict) -> str:
    if "substitution" in witness:
        return "substitute " + ", ".join(f"position {p} -> token {t}" for p, t in witness["substitution"].items())
    return f"a perturbation of norm {witness['delta_norm']:.4g} (the whole delta is in --json)"
