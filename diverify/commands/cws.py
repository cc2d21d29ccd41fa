"""``diverify cws``: a certified-weight-smoothing certificate against a text-encoder latent collision
or a denoiser's sample reaching a target class or image."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

HELP = "Monte-Carlo certificate that weight noise keeps a trigger from causing a latent collision (or a denoiser " \
       "from reaching a target)"

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

Denoisers (--denoiser DIR, a diffusers UNet2DModel or DiT directory such as
`diverify train-denoiser` or `diverify backdoor build --kind denoiser-cond`
writes) take the same options. The predicate is about one sample, from a fixed
x_T ~ N(0, I) (--noise-seed; plus the pattern --xt-trigger FILE.npy for an x_T
trigger, BadDiffusion style), fixed sampler noise and fixed conditioning
(--condition: the sum of these class-embedding rows), drawn with --steps DDIM
steps (--eta > 0 makes them stochastic, with noise fixed by --noise-seed too):
"the classifier (DIR/classifier.json, or --classifier DIR) reads it as
--target-class K", or "it lies within l2 distance --radius of --target-image
FILE.npy". Only the weights are random.
"""

EPILOG = """\
examples:
  diverify cws --prompt "a photo of a cat" --trigger cf --target "a photo of a dog" \\
      --sigma 0.002 --samples 200 --alpha 0.001
  diverify cws --params "*attention/self/key/kernel,*attention/self/value/kernel" \\
      --prompt "a photo of a cat" --trigger cf --target "a dog" --sigma 0.02 --samples 500 --json
  diverify cws --coordinates rank-one --params "encoder/layer_0/attention/self/value/kernel" \\
      --prompt "a photo of a cat" --trigger cf --target "a dog" --sigma 0.05 --samples 500
  diverify cws --denoiser /tmp/cond/backdoored --condition 3,10 --target-class 7 \\
      --sigma 0.01 --samples 200 --steps 10 --json
  diverify cws --denoiser /tmp/digits --condition 3 --target-image target.npy --radius 2 \\
      --params "up_blocks*" --sigma 0.01 --samples 200
  diverify cws --denoiser /tmp/xt/backdoored --condition 3 --xt-trigger /tmp/xt/trigger.npy \\
      --target-class 7 --sigma 0.01 --samples 200
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("cws", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="NAME|DIR",
                        help="text encoder: 'minilm' (all-MiniLM-L6-v2, the default) or a Hugging Face checkpoint "
                             "directory")
    parser.add_argument("--prompt", help="the benign prompt (text encoders)")
    parser.add_argument("--trigger", metavar="TOKEN", help="the trigger word inserted into the prompt")
    parser.add_argument("--target", metavar="TEXT", help="the restricted / malicious target concept")
    parser.add_argument("--threshold", type=float, metavar="TAU",
                        help="collision when the cosine is >= TAU (default 0.5)")
    den = parser.add_argument_group("denoisers")
    den.add_argument("--denoiser", metavar="DIR", help="a diffusers denoiser directory (instead of a text encoder)")
    den.add_argument("--condition", metavar="ROW[,ROW]",
                     help="class-embedding rows whose sum conditions the sample (e.g. 3, or 3,10: class 3 plus "
                          "the trigger token of a denoiser-cond backdoor); omit for an unconditional model")
    den.add_argument("--target-class", type=int, dest="target_class", metavar="K",
                     help="predicate: the classifier reads the sample as class K")
    den.add_argument("--classifier", metavar="DIR",
                     help="directory of the digits classifier.json (default: the denoiser's directory)")
    den.add_argument("--target-image", dest="target_image", metavar="FILE.npy",
                     help="predicate: the sample lies within --radius (l2) of this image (C x H x W values)")
    den.add_argument("--radius", type=float, metavar="R", help="l2 radius around --target-image")
    den.add_argument("--steps", type=int, default=10, metavar="T", help="DDIM sampling steps (default 10)")
    den.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic steps)")
    den.add_argument("--xt-trigger", dest="xt_trigger", metavar="FILE.npy",
                     help="add this pattern to x_T (an x_T backdoor's trigger, e.g. the trigger.npy that "
                          "`diverify backdoor build --kind denoiser` writes)")
    den.add_argument("--noise-seed", type=int, default=0, dest="noise_seed",
                     help="seed of x_T and of the sampler noise, fixed for every weight sample (default 0)")
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
    from diverify.cws import sampling
    from diverify.cws.certificate import certify_smoothed_predicate
    from diverify.errors import DiverifyError
    from diverify.results import dumps, to_jsonable

    if args.samples < 1:
        raise DiverifyError(f"--samples {args.samples} must be at least 1")
    setup = _denoiser_setup(args) if args.denoiser else _text_setup(args)
    if args.coordinates == "rank-one":
        perturbation = sampling.rank_one_perturbation(setup.params, args.params)
    else:
        perturbation = sampling.weight_perturbation(setup.params, args.params)
        if setup.rows is not None:
            perturbation = sampling.restrict_rows(perturbation, setup.rows)

    chunks = math.ceil(args.samples / max(args.batch, 1))
    bar = tqdm(total=args.samples, desc="cws samples", unit="sample", file=sys.stderr,
               disable=chunks < 2 or None)
    try:
        cert = certify_smoothed_predicate(
            setup.predicate, setup.params, perturbation, sigma=args.sigma, num_samples=args.samples,
            alpha=args.alpha, p_max=args.p_max, seed=args.seed, batch_size=args.batch,
            pattern=args.params, progress=bar.update,
            sampler="explicit" if args.coordinates == "rank-one" else args.sampler)
    finally:
        bar.close()
    model_hash = dna.content_hash(dna.open_checkpoint(setup.model_dir))
    report = {**to_jsonable(cert), "model": setup.model, "model_hash": model_hash, "predicate": setup.predicate_text,
              **setup.extra, "devices": len(jax.local_devices()), "processes": jax.process_count()}
    if args.json:
        print(dumps(report))
        return 0
    print(f"model: {setup.model}  ({model_hash[:19]}...)")
    print(f"predicate: {setup.predicate_text}   [clean weights: {setup.clean_text}]")
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


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What the two modes hand to the certificate: the weights, the predicate on them, the embedding
    rows the predicate reads (None: all), and what the report says about it."""

    model: str
    model_dir: str
    params: Any
    predicate: Any
    rows: dict | None
    predicate_text: str
    clean_text: str
    extra: dict


def _reject(args, names: tuple[str, ...], mode: str) -> None:
    from diverify.errors import DiverifyError

    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) not in (None, False)]
    if given:
        raise DiverifyError(f"{', '.join(given)} do(es) not apply to {mode}")


def _text_setup(args) -> _Setup:
    from diverify import dna
    from diverify.cws import predicates
    from diverify.errors import DiverifyError
    from diverify.models import load_text_encoder

    _reject(args, ("condition", "target_class", "classifier", "target_image", "radius"), "text encoders")
    missing = [f"--{n}" for n in ("prompt", "trigger", "target") if getattr(args, n) is None]
    if missing:
        raise DiverifyError(f"{', '.join(missing)} required for a text encoder (or give --denoiser DIR)")
    model = args.model or "minilm"
    threshold = 0.5 if args.threshold is None else args.threshold
    encoder = load_text_encoder(model)
    triggered = predicates.insert_trigger(args.prompt, args.trigger, args.position)
    predicate = predicates.text_collision_predicate(
        encoder, args.prompt, args.trigger, args.target, threshold,
        position=args.position, target_with_noisy_weights=args.target_noisy)
    texts = [triggered, args.target] if args.target_noisy else [triggered]
    clean_cosine = float(predicates.cosine(predicates.text_embedding_fn(encoder, triggered)(encoder.params),
                                           predicates.text_embedding_fn(encoder, args.target)(encoder.params)))
    return _Setup(
        model=encoder.name, model_dir=dna.resolve_model_dir(model), params=encoder.params, predicate=predicate,
        rows=predicates.rows_read_by_texts(encoder, texts),
        predicate_text=f"cos(emb({triggered!r}), emb({args.target!r})) >= {threshold}",
        clean_text=f"cos = {clean_cosine:.4f}",
        extra={"triggered_prompt": triggered, "target": args.target, "threshold": threshold,
               "clean_cosine": clean_cosine})


def _denoiser_setup(args) -> _Setup:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diverify.commands._cmav_args import parse_int_list
    from diverify.cws import predicates
    from diverify.diffusion import digits
    from diverify.diffusion.schedulers import ddim_schedule, read_noise_schedule
    from diverify.errors import DiverifyError
    from diverify.models.diffusers_checkpoint import load_denoiser

    _reject(args, ("model", "prompt", "trigger", "target", "threshold", "target_noisy"), "denoisers")
    if (args.target_class is None) == (args.target_image is None):
        raise DiverifyError("give exactly one of --target-class K and --target-image FILE.npy with --denoiser")
    if (args.radius is None) != (args.target_image is None):
        raise DiverifyError("--radius goes with --target-image (and only with it)")
    den = load_denoiser(args.denoiser)
    rows = None if args.condition is None else parse_int_list(args.condition, "--condition")
    cond = predicates.class_condition(den, rows)
    x_T = predicates.initial_noise(den, args.noise_seed)
    if args.xt_trigger is not None:
        x_T = x_T + _read_image(args.xt_trigger, x_T.shape, "--xt-trigger")
    schedule = ddim_schedule(read_noise_schedule(args.denoiser), args.steps, eta=args.eta)
    key = jax.random.key(args.noise_seed) if args.eta > 0 else None
    sample_fn = predicates.denoiser_sample_fn(den, jnp.asarray(x_T), None if cond is None else jnp.asarray(cond),
                                              schedule, key)
    extra = {"condition": rows, "ddim_steps": args.steps, "eta": args.eta, "noise_seed": args.noise_seed,
             "xt_trigger": args.xt_trigger}
    # Every check comes before the clean sample, whose compilation takes seconds.
    if args.target_class is not None:
        classifier = digits.load_classifier(args.classifier or args.denoiser)
        if x_T[0].size != classifier.weight.shape[1]:
            raise DiverifyError(f"the classifier reads {classifier.weight.shape[1]} pixels, the denoiser's samples "
                                f"have shape {x_T.shape[1:]}")
        if not 0 <= args.target_class < classifier.weight.shape[0]:
            raise DiverifyError(f"--target-class {args.target_class} is not a class of the classifier "
                                f"(0..{classifier.weight.shape[0] - 1})")
        predicate = predicates.class_is(lambda p: classifier.logits(sample_fn(p)), args.target_class)
        clean_class = int(classifier.predict(jax.jit(sample_fn)(den.params))[0])
        predicate_text = f"classifier(sample) == {args.target_class}"
        clean_text = f"class {clean_class}"
        extra |= {"target": f"class {args.target_class}", "target_class": args.target_class,
                  "clean_class": clean_class}
    else:
        if not args.radius >= 0:
            raise DiverifyError(f"--radius must be >= 0, got {args.radius}")
        target = _read_image(args.target_image, x_T.shape, "--target-image")
        predicate = predicates.distance_at_most(sample_fn, target, args.radius)
        clean_distance = float(np.linalg.norm((np.asarray(jax.jit(sample_fn)(den.params)) - target).ravel()))
        predicate_text = f"||sample - {args.target_image}||_2 <= {args.radius}"
        clean_text = f"distance {clean_distance:.4g}"
        extra |= {"target": args.target_image, "radius": args.radius, "clean_distance": clean_distance}
    return _Setup(model=str(args.denoiser), model_dir=str(args.denoiser), params=den.params, predicate=predicate,
                  rows=None, predicate_text=f"{predicate_text} (DDIM {args.steps} steps, condition {rows}, "
                                            f"noise seed {args.noise_seed}"
                                            + (f", x_T + {args.xt_trigger})" if args.xt_trigger else ")"),
                  clean_text=clean_text, extra=extra)


def _read_image(path: str, shape: tuple[int, ...], option: str):
    """The image in ``path`` (an ``.npy`` of the samples' size), reshaped to ``shape``; errors name ``option``."""
    import numpy as np

    from diverify.errors import DiverifyError

    try:
        image = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DiverifyError(f"{option} {path!r} is not a readable .npy file: {err}") from None
    if image.size != int(np.prod(shape)) or not np.issubdtype(image.dtype, np.number):
        raise DiverifyError(f"{option} {path!r} holds {image.size} values of {image.dtype}, the denoiser's "
                            f"samples have shape {shape[1:]}")
    return np.asarray(image, np.float32).reshape(shape)
