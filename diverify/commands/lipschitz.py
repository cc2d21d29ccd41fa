"""``diverify lipschitz``: certified per-step and cumulative Lipschitz bounds of a reverse diffusion chain."""

from __future__ import annotations

import argparse
import json
import sys

from diverify.commands import _cmav_args as common

HELP = "certified Lipschitz bounds of the reverse diffusion chain x_T -> x_0, next to empirical lower bounds"

DESCRIPTION = """\
Bounds how much the final sample x_0 can move when the noise seed x_T moves by r
(l2), for a diffusers denoiser directory or the exact-score Gaussian mixture
('gmm'). Stochastic samplers (ddpm, ddim with --eta > 0) use one fixed noise draw.

  global  product over steps of per-step global Lipschitz bounds (per-layer operator
          norms; UNets without attention, or the mixture); also w.r.t. the class weights
  local   the bound engine bounds each step over an l2 ball around the clean
          trajectory; the ball radius is carried from step to step (zonotope and
          forward carry it through the spectral norm of the step's linear part)
  reach   the engine's output set of each step is the next step's input set: with
          zonotope/forward the output's affine form in the x_T ball's coordinates,
          so the steps' linear parts compose into the chain's own Jacobian instead
          of a product of per-step norms (digits UNet, T = 50, r = 1e-5, --precision
          mixed: 2.34, the chain's Jacobian norm 2.27, local 11.5); with other
          engine methods the output box
          (local and reach trace and compile one bound for all T steps, by default
          in mixed precision for a model directory, whose GroupNorms would amplify
          float32's padding floor until the bound fails, and in float32 for the
          mixture: on the digits UNet it compiles in ~1 min and bounds a step in
          ~2.7 s on 2 CPU cores; at r = 1e-3, T = 10, reach gives 2.3x the attack,
          and at the default r = 0.01 the set outgrows what the engine can bound)

Each certified number is printed next to an empirical lower bound (Jacobian power
iteration and a gradient attack). With --distance d, the certified radius in x_T
(final sample provably within d of the clean one) and the attack's radius; global
also gives the radius in the class weights. With --keep-decision, d is the clean
final sample's distance to the decision boundary of a classifier (the digits
directory's classifier.json, or the mixture's Bayes rule): the certified radius
keeps the class, and the attack tries to change it.
"""

EPILOG = """\
examples:
  diverify lipschitz --denoiser gmm --steps 10 --method global
  diverify lipschitz --denoiser runs/digits --steps 10 --method global --json
  diverify lipschitz --denoiser gmm --gmm-dim 8 --steps 5 --method reach --radius 0.05 --distance 0.5
  diverify lipschitz --denoiser gmm --steps 25 --method reach --radius 0.01 --keep-decision
  diverify lipschitz --denoiser runs/digits --steps 50 --method reach --radius 1e-5 --refine none
  diverify lipschitz --denoiser runs/digits --sampler ddpm --steps 25 --method global --plot lip.png
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("lipschitz", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--denoiser", required=True, metavar="DIR|gmm",
                        help="a diffusers model directory (UNet2DModel / DiT) or 'gmm' (exact-score mixture)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="sampler (default ddim)")
    parser.add_argument("--steps", type=int, default=10, metavar="T", help="sampling steps (default 10)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic)")
    parser.add_argument("--method", default="global", help="global, local or reach (default global)")
    parser.add_argument("--radius", type=float, default=0.01, metavar="R",
                        help="l2 radius of the x_T ball for local/reach and the attack (default 0.01)")
    parser.add_argument("--distance", type=float, default=None, metavar="D",
                        help="also find the certified and the empirical radius keeping x_0 within D")
    parser.add_argument("--eager", action="store_true",
                        help="run the local/reach bound op by op instead of compiling it as one XLA program "
                             "(no compilation wait, but each step is slower: 41 s instead of 10 s on the digits UNet)")
    parser.add_argument("--keep-decision", action="store_true",
                        help="certify the radius that keeps the classifier's decision on x_0 (instead of --distance)")
    parser.add_argument("--engine-method", default="zonotope",
                        help="bound-engine method for local/reach: ibp, forward, zonotope, crown-ibp, crown-forward, "
                             "crown-zonotope, crown, alpha-crown (default zonotope)")
    parser.add_argument("--precision", choices=("auto",) + common.PRECISIONS, default="auto",
                        help="arithmetic of the bound engine for local/reach (default auto: mixed for a model "
                             "directory, float32 for gmm; float64 pads at ~1e-16 relative where a UNet's GroupNorms "
                             "amplify float32's ~1e-6 padding floor until the bound fails; mixed: float64 with the "
                             "zonotope's error coefficients in float32, their rounding bounded: on the digits UNet "
                             "~1.5x faster than float64 a step for 0.04%% of the bound)")
    common.add_symbols_option(parser)
    common.add_refine_option(parser, help="which intervals of the zonotope engine methods a backward CROWN pass "
                                          "tightens once symbols have been boxed (as in 'diverify bounds'; default "
                                          "normalisers: the GroupNorm variances); none: the zonotope alone, on the "
                                          "digits UNet at r = 1e-5 the same bound, compiled in ~45 s instead of ~64 s")
    parser.add_argument("--label", type=int, default=0, help="class label for class-conditional models (default 0)")
    parser.add_argument("--gmm-dim", type=int, default=2, metavar="D", help="dimension of the gmm fixture (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of x_T and of the fixed noise (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="FILE.png", help="log-scale plot of per-step/cumulative vs empirical")
    parser.set_defaults(func=run)


def _gmm_setup(args):
    import jax.numpy as jnp
    import numpy as np

    from diverify.diffusion import gmm
    from diverify.diffusion.schedulers import noise_schedule
    from diverify.errors import DiverifyError
    from diverify.lipschitz import gmm_eps_lipschitz, mixture_decision

    if args.gmm_dim < 1:
        raise DiverifyError(f"--gmm-dim must be >= 1, got {args.gmm_dim}")
    noise = noise_schedule(clip_sample=False)
    means = np.zeros((2, args.gmm_dim))
    means[0, 0], means[1, 0] = -1.0, 1.0
    mixture = gmm.gaussian_mixture([0.5, 0.5], means, [0.3, 0.3], noise)
    rng = np.random.default_rng(args.seed)
    x_T = jnp.asarray(rng.normal(size=(1, args.gmm_dim)), jnp.float32)

    def lip(t):
        return gmm_eps_lipschitz(mixture, float(noise.alphas_cumprod[t])), None

    return gmm.gmm_eps, mixture, None, noise, x_T, lip, lambda: mixture_decision(mixture)


def _dir_setup(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diverify.diffusion.schedulers import read_noise_schedule
    from diverify.errors import DiverifyError
    from diverify.lipschitz import unet_eps_lipschitz
    from diverify.models.diffusers_checkpoint import load_denoiser

    den = load_denoiser(args.denoiser)
    noise = read_noise_schedule(args.denoiser)
    size = den.sample_size or 8
    rng = np.random.default_rng(args.seed)
    x_T = jnp.asarray(rng.normal(size=(1, den.in_channels, size, size)), jnp.float32)
    classes = getattr(den.config, "num_class_embeds", None) or getattr(den.config, "num_classes", None)
    cond = None
    if classes:
        if not 0 <= args.label < classes:
            raise DiverifyError(f"--label must be in 0..{classes - 1}, got {args.label}")
        # Class weights (one-hot rows) rather than an id: the conditioning is then a continuous input.
        cond = jax.nn.one_hot(jnp.array([args.label]), classes) if den.class_name != "DiTTransformer2DModel" \
            else jnp.array([args.label])
    lip = None
    if den.class_name == "UNet2DModel":
        bounds = unet_eps_lipschitz(den.config, den.params)
        lip = lambda t: bounds  # noqa: E731

    def decision():
        from diverify.diffusion.digits import load_classifier
        from diverify.lipschitz import LinearDecision

        classifier = load_classifier(args.denoiser)
        return LinearDecision(classifier.weight, classifier.bias)

    return den.eps, den.params, cond, noise, x_T, lip, decision


def _plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # Everything is drawn as log10 on a linear axis: a UNet's cumulative global product overflows float64.
    steps = np.arange(1, report.steps + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, np.log10(report.per_step), "o-", label=f"certified per step ({report.method})")
    ax.plot(steps, np.cumsum(np.log10(report.per_step)), "s-", label="certified cumulative")
    ax.plot(steps, np.log10(report.empirical_per_step), "x--", label="empirical ||J|| per step")
    ax.axhline(np.log10(report.empirical_lower), color="k", ls=":", label="empirical whole-chain lower bound")
    ax.set_xlabel("step")
    ax.set_ylabel("log10 Lipschitz bound")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _radius(value, log10_value=None) -> str:
    """A radius for people; one that underflows float64 as its power of ten."""
    if value is None:
        return "none found"
    if value == 0.0 and log10_value is not None:
        return f"0 (10^{log10_value:.1f})"
    return f"{value:.4g}"


def engine_precision(precision: str, denoiser: str) -> str:
    """``--precision`` resolved: ``auto`` is ``mixed`` for a model directory (a UNet's GroupNorms amplify
    float32's padding floor until its bound fails) and ``float32`` for the ``gmm`` mixture."""
    if precision != "auto":
        return precision
    return "float32" if denoiser == "gmm" else "mixed"


def run(args) -> int:
    import jax

    from diverify.diffusion.schedulers import ddim_schedule, ddpm_schedule
    from diverify.errors import DiverifyError
    from diverify.lipschitz import METHODS, lipschitz_report, make_chain
    from diverify.results import to_jsonable

    if args.method not in METHODS:
        raise DiverifyError(f"unknown --method {args.method!r}: choose one of {', '.join(METHODS)}")
    if not args.radius > 0:
        raise DiverifyError(f"--radius must be > 0, got {args.radius}")
    if args.keep_decision and args.distance is not None:
        raise DiverifyError("--keep-decision sets the distance itself: drop --distance")
    common.check_symbols(args.symbols)
    setup = _gmm_setup if args.denoiser == "gmm" else _dir_setup
    apply_fn, params, cond, noise, x_T, lip, decision = setup(args)
    decision = decision() if args.keep_decision else None
    schedule = ddim_schedule(noise, args.steps, eta=args.eta) if args.sampler == "ddim" \
        else ddpm_schedule(noise, args.steps)
    chain = make_chain(apply_fn, params, cond, schedule, x_T, jax.random.PRNGKey(args.seed))
    progress = None
    bar = None
    if args.method != "global" and not args.json:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, desc=f"{args.method} bounds", file=sys.stderr)
        progress = bar.update
    report = lipschitz_report(chain, args.method, args.radius, lip, args.engine_method, args.distance,
                              jax.random.PRNGKey(args.seed), progress=progress,
                              precision=engine_precision(args.precision, args.denoiser),
                              decision=decision, eager=args.eager, symbols=args.symbols, refine=args.refine)
    if bar is not None:
        bar.close()
    if args.plot:
        _plot(report, args.plot)
    if args.json:
        print(json.dumps(to_jsonable(report)))
        return 0
    engine = "" if report.precision is None else f", {args.engine_method} in {report.precision}"
    print(f"{args.method} bounds{engine}, {args.sampler} T={args.steps}, radius {args.radius:g} "
          f"({report.seconds:.1f} s)")
    print(f"{'step':>4} {'certified':>12} {'empirical ||J||':>16}")
    for i, (b, e) in enumerate(zip(report.per_step, report.empirical_per_step)):
        print(f"{i:>4} {b:>12.4g} {e:>16.4g}")
    print(f"cumulative certified {report.cumulative:.4g} (log10 {report.log10_cumulative:.2f})   empirical lower {report.empirical_lower:.4g}   "
          f"ratio {report.cumulative / max(report.empirical_lower, 1e-30):.3g}")
    if report.cond_cumulative is not None:
        print(f"w.r.t. the conditioning: certified {report.cond_cumulative:.4g} (log10 {report.log10_cond_cumulative:.2f})")
    certified = _radius(report.certified_radius, report.log10_certified_radius)
    if report.decision_label is not None:
        print(f"radius keeping the classifier's decision (class {report.decision_label}, clean x_0 at "
              f"{report.distance:.4g} from its boundary): certified {certified}   "
              f"attack changes it above {_radius(report.empirical_radius)}")
    elif report.distance is not None:
        print(f"radius keeping x_0 within {report.distance:g}: certified {certified}   "
              f"attack {_radius(report.empirical_radius)}")
    if report.cond_certified_radius is not None:
        print(f"radius in the class weights keeping x_0 within {report.distance:.4g}: certified "
              f"{_radius(report.cond_certified_radius, report.log10_cond_certified_radius)}")
    return 0
