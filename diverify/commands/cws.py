"""``diverify cws``: a certified-weight-smoothing certificate against a text-encoder latent collision."""

from __future__ import annotations

import argparse

HELP = "Monte-Carlo certificate that weight noise keeps a trigger from causing a latent collision"

DESCRIPTION = """\
Certified weight smoothing (CWS) for a text encoder. Draws N noisy copies of the
weights theta + N(0, sigma^2 I) (all weights, the ones matching --params, or
rank-one edit coordinates u v^T of the matching matrices), counts how often
cos(emb(prompt with trigger), emb(target)) >= tau, and reports the exact
Clopper-Pearson upper bound p_upper on that probability at confidence 1 - alpha.

certified_edit_radius R = sigma * (Phi^-1(p_max) - Phi^-1(p_upper)): no weight edit
of l2 norm <= R (in the smoothing coordinates; for rank-one coordinates a single
edit u v^T is covered when ||u v^T||_F <= R^2 / 2) can lift the probability of the
*smoothed* encoder (fresh noise at every use) above p_max. The bound is about the
smoothed model, not the bare weights, and holds with probability 1 - alpha.

Weight noise on Dense kernels and on the looked-up embedding rows is drawn at the
layer's output by default (--sampler local: X E for noise E on a kernel, sampled as
a Gaussian with covariance X X^T, exactly the same law of the outcome, ~30x faster on
CPU); --sampler explicit adds theta + noise to every weight. Any weight the local
sampler cannot treat exactly (a layer applied twice, a kernel read outside its Dense
layer) gets explicit noise automatically.

The trigger is inserted as a word at word --position (0: first, right after the
CLS/BOS token); the target's embedding uses the clean weights unless
--target-noisy recomputes it with each sample's weights.
"""

EPILOG = """\
examples:
  diverify cws --prompt "a photo of a cat" --trigger cf --target "a photo of a dog" \\
      --sigma 0.002 --samples 200 --alpha 0.001
  diverify cws --params "*attention/self/key/kernel,*attention/self/value/kernel" \\
      --prompt "a photo of a cat" --trigger cf --target "a dog" --sigma 0.02 --samples 500 --json
  diverify cws --coordinates rank-one --params "encoder/layer_0/attention/self/value/kernel" \\
      --prompt "a photo of a cat" --trigger cf --target "a dog" --sigma 0.05 --samples 500
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("cws", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", metavar="NAME|DIR",
                        help="'minilm' (all-MiniLM-L6-v2, the default) or a Hugging Face checkpoint directory")
    parser.add_argument("--prompt", required=True, help="the benign prompt")
    parser.add_argument("--trigger", required=True, metavar="TOKEN", help="the trigger word inserted into the prompt")
    parser.add_argument("--target", required=True, metavar="TEXT", help="the restricted / malicious target concept")
    parser.add_argument("--threshold", type=float, default=0.5, metavar="TAU",
                        help="collision when the cosine is >= TAU (default 0.5)")
    parser.add_argument("--sigma", type=float, required=True, help="standard deviation of the weight noise")
    parser.add_argument("--samples", type=int, default=1000, metavar="N", help="Monte-Carlo samples (default 1000)")
    parser.add_argument("--alpha", type=float, default=0.001,
                        help="failure probability of the certificate (default 0.001)")
    parser.add_argument("--params", default="*", metavar="PATTERN",
                        help="comma-separated globs over parameter paths, or re:REGEX (default '*': all weights)")
    parser.add_argument("--coordinates", choices=("weights", "rank-one"), default="weights",
                        help="smooth the weights themselves, or rank-one edit coordinates (u, v) of the "
                             "selected matrices (default: weights)")
    parser.add_argument("--p-max", type=float, default=0.5, dest="p_max",
                        help="the radius keeps the smoothed collision probability <= P_MAX (default 0.5)")
    parser.add_argument("--position", type=int, default=0,
                        help="word position of the trigger in the prompt (default 0; -1 appends)")
    parser.add_argument("--target-noisy", action="store_true", dest="target_noisy",
                        help="recompute the target embedding with each sample's noisy weights")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (same seed, same counts on any device count)")
    parser.add_argument("--sampler", choices=("local", "explicit"), default="local",
                        help="how weight noise is drawn (same law, same certificate): at the layer outputs "
                             "(local, default) or on the weights themselves (explicit); rank-one coordinates "
                             "are always explicit")
    parser.add_argument("--batch", type=int, default=8, metavar="B",
                        help="samples per jit-compiled chunk, over all local devices (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    import math
    import sys

    import jax
    import numpy as np
    from tqdm import tqdm

    from diverify import dna
    from diverify.cws import predicates, sampling
    from diverify.cws.certificate import certify_smoothed_predicate
    from diverify.errors import DiverifyError
    from diverify.models import load_text_encoder
    from diverify.results import dumps, to_jsonable

    if args.samples < 1:
        raise DiverifyError(f"--samples {args.samples} must be at least 1")
    encoder = load_text_encoder(args.model)
    triggered = predicates.insert_trigger(args.prompt, args.trigger, args.position)
    predicate = predicates.text_collision_predicate(
        encoder, args.prompt, args.trigger, args.target, args.threshold,
        position=args.position, target_with_noisy_weights=args.target_noisy)
    if args.coordinates == "rank-one":
        perturbation = sampling.rank_one_perturbation(encoder.params, args.params)
    else:
        perturbation = sampling.weight_perturbation(encoder.params, args.params)
        texts = [triggered, args.target] if args.target_noisy else [triggered]
        perturbation = sampling.restrict_rows(perturbation, predicates.rows_read_by_texts(encoder, texts))
    clean_cosine = float(predicates.cosine(predicates.text_embedding_fn(encoder, triggered)(encoder.params),
                                           predicates.text_embedding_fn(encoder, args.target)(encoder.params)))

    chunks = math.ceil(args.samples / max(args.batch, 1))
    bar = tqdm(total=args.samples, desc="cws samples", unit="sample", file=sys.stderr,
               disable=chunks < 2 or None)
    try:
        cert = certify_smoothed_predicate(
            predicate, encoder.params, perturbation, sigma=args.sigma, num_samples=args.samples,
            alpha=args.alpha, p_max=args.p_max, seed=args.seed, batch_size=args.batch,
            pattern=args.params, progress=bar.update,
            sampler="explicit" if args.coordinates == "rank-one" else args.sampler)
    finally:
        bar.close()
    model_hash = dna.content_hash(dna.open_checkpoint(dna.resolve_model_dir(args.model)))
    report = {**to_jsonable(cert), "model": encoder.name, "model_hash": model_hash,
              "triggered_prompt": triggered, "target": args.target, "threshold": args.threshold,
              "clean_cosine": clean_cosine, "devices": len(jax.local_devices()),
              "processes": jax.process_count()}
    if args.json:
        print(dumps(report))
        return 0
    print(f"model: {encoder.name}  ({model_hash[:19]}...)")
    print(f"predicate: cos(emb({triggered!r}), emb({args.target!r})) >= {args.threshold}"
          f"   [clean weights: cos = {clean_cosine:.4f}]")
    print(f"smoothing: {cert.coordinates} coordinates of {args.params!r}, "
          f"{cert.num_perturbed_params:,} weights, sigma = {cert.sigma:g}")
    rows = [
        ("samples n / hits k", f"{cert.n} / {cert.k}"),
        ("p_hat", f"{cert.p_hat:.4g}"),
        (f"p_upper (1 - alpha = {1 - cert.alpha:g})", f"{cert.p_upper:.4g}"),
        (f"certified edit radius (p_max = {cert.p_max:g})", f"{cert.certified_edit_radius:.4g}"),
        ("covered edit Frobenius norm", f"{cert.covered_edit_fro_norm:.4g}"),
        ("time", f"{cert.seconds:.1f} s, of which {cert.compile_seconds:.1f} s compiling "
                 f"({cert.samples_per_second:.2f} samples/s after compilation on {report['devices']} device(s), "
                 f"{cert.sampler} noise)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if np.isfinite(cert.certified_edit_radius) and cert.certified_edit_radius == 0.0:
        print("  nothing certified: p_upper >= p_max (more samples, a larger sigma or a larger p_max)")
    return 0
