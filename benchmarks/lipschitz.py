"""Lipschitz bounds of the reverse DDIM chain on the trained digits denoiser, the exact-score
mixture, or a DiT-S/2-sized model.

For each T: the global product, the local (balls) and reach (the engine's output sets) bounds for each
engine method and radius, and the empirical lower bound, with seconds (total, and the engine's
tracing + compilation, done once for all steps). A method the engine cannot bound for this
model is reported with its error, not skipped. ``--diagnose`` bounds the first step once per
engine method and radius and prints where the intervals widen: the half-width of every
GroupNorm's variance and output, up to the first node whose relaxation fails.

    python benchmarks/lipschitz.py                       # trains benchmarks/out/digits-denoiser once
    python benchmarks/lipschitz.py --steps 10 --methods global
    python benchmarks/lipschitz.py --gmm --steps 10 25 50 --methods local reach --radii 0.01
    python benchmarks/lipschitz.py --diagnose --engine-methods crown-forward zonotope --radii 1e-3 1e-5
    python benchmarks/lipschitz.py --precision float32 --steps 10 --methods local  # the engine in float32
    python benchmarks/lipschitz.py --dit --steps 50 --methods local   # DiT-S/2 random weights (GPU)
    python benchmarks/lipschitz.py --gmm 2 --methods global reach --keep-decision   # certified radii of the label

``--keep-decision`` adds the certified radius in x_T that keeps the classifier's decision on x_0 (the digits
directory's classifier, the mixture's Bayes rule), next to the radius above which the attack changes it,
and (global) the certified radius in the class weights for the same distance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diverify.bounds.backward import REFINE_SCOPES
from diverify.diffusion import gmm
from diverify.diffusion.schedulers import ddim_schedule, noise_schedule, read_noise_schedule
from diverify.errors import DiverifyError
from diverify.diffusion.digits import load_classifier
from diverify.lipschitz import (PRECISION, PRECISIONS, LinearDecision, clean_trajectory, compile_step_bound,
                                gmm_eps_lipschitz, lipschitz_report, make_chain, mixture_decision, rechain,
                                unet_eps_lipschitz)
from diverify.models.diffusers_checkpoint import build_denoiser, load_denoiser
from diverify.results import to_jsonable
from diverify.specs import Box, lp_ball

OUT = Path(__file__).parent / "out"

#: DiT-S/2 (Peebles & Xie 2023): 12 blocks, width 384, 6 heads, patch 2, on 32x32x4 latents.
DIT_S2 = {"_class_name": "DiTTransformer2DModel", "sample_size": 32, "in_channels": 4, "out_channels": 8,
          "patch_size": 2, "num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64,
          "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero"}


def digits_model(directory: Path):
    if not (directory / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "diverify.cli", "train-denoiser", "--dataset", "digits",
                        "--out", str(directory), "--json"], check=True)
    den = load_denoiser(directory)
    noise = read_noise_schedule(directory)
    x_T = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, 8, 8)), jnp.float32)
    bounds = unet_eps_lipschitz(den.config, den.params)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(den.params))
    classifier = load_classifier(directory)
    return den.eps, den.params, noise, jax.nn.one_hot(jnp.array([3]), 10), x_T, (lambda t: bounds), \
        f"{den.class_name} ({n_params} parameters)", LinearDecision(classifier.weight, classifier.bias)


def gmm_model(dim: int):
    """The CLI's mixture: modes at +-e1, std 0.3, x_T from seed 0."""
    noise = noise_schedule(clip_sample=False)
    means = np.zeros((2, dim))
    means[0, 0], means[1, 0] = -1.0, 1.0
    mix = gmm.gaussian_mixture([0.5, 0.5], means, [0.3, 0.3], noise)
    x_T = jnp.asarray(np.random.default_rng(0).normal(size=(1, dim)), jnp.float32)
    return gmm.gmm_eps, mix, noise, None, x_T, \
        (lambda t: (gmm_eps_lipschitz(mix, float(noise.alphas_cumprod[t])), None)), f"Gaussian mixture (d = {dim})", \
        mixture_decision(mix)


def dit_model(layers: int):
    den = build_denoiser(dict(DIT_S2, num_layers=layers), seed=0)
    noise = noise_schedule(clip_sample=False)
    x_T = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 32, 32)), jnp.float32)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(den.params))
    return den.eps, den.params, noise, jnp.array([3]), x_T, None, f"DiT, {layers} blocks ({n_params} parameters)", None


def diagnose(chain, engine_method: str, radius: float, compiled: dict, memory_limit: int | None,
             precision: str, symbols: int | None = None) -> dict:
    """Bound step 0 over the l2 ball of ``radius`` and return the interval half-widths of every
    GroupNorm variance (its ``rsqrt`` input) and output, up to the first node whose relaxation fails."""
    traj = clean_trajectory(chain)
    ball = lp_ball(traj[0].reshape(1, -1), radius, p=2)
    if "LpBall" not in compiled:
        compiled["LpBall"] = compile_step_bound(chain, ball, engine_method, memory_limit, precision, symbols=symbols)
    sb = compiled["LpBall"]
    k = chain.inputs[:1]
    res = sb.raw(ball, Box(k, k))
    nodes = sb.bound_function.graph.nodes
    ok = np.asarray(res.node_ok)
    first_bad = int(np.argmin(ok)) if not ok.all() else None
    intervals = {int(key.split(":")[0]): iv for key, iv in res.intermediates.items()}
    producer = {vid: idx for idx, node in enumerate(nodes) for vid in node.outputs}
    norms = []
    for idx, node in enumerate(nodes):
        if first_bad is not None and idx > first_bad:
            break
        if node.name == "rsqrt":
            iv = intervals.get(producer.get(node.inputs[0]))
            lo = None if iv is None else float(jnp.min(iv.lower))
            norms.append(dict(node=idx, source=node.source.rsplit("/", 1)[-1], var_lower_min=lo,
                              var_halfwidth_max=None if iv is None else float(jnp.max(iv.upper - iv.lower)) / 2,
                              ok=bool(ok[idx])))
    return dict(engine_method=engine_method, radius=radius, precision=precision, nodes=len(nodes),
                compile_seconds=sb.compile_seconds,
                first_failure=None if first_bad is None else f"{first_bad}:{nodes[first_bad].name}",
                out_halfwidth=float(jnp.max(res.output.upper - res.output.lower)) / 2
                if first_bad is None else None, groupnorms=norms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--denoiser", type=Path, default=OUT / "digits-denoiser")
    parser.add_argument("--gmm", type=int, default=None, metavar="D", help="the exact-score mixture in dimension D")
    parser.add_argument("--dit", type=int, default=None, metavar="LAYERS",
                        help="DiT-S/2-sized random-weight model with LAYERS blocks (12 for DiT-S/2)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--methods", nargs="+", default=["global", "local", "reach"])
    parser.add_argument("--radii", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--engine-methods", nargs="+", default=["zonotope"])
    parser.add_argument("--precision", choices=PRECISIONS, default=PRECISION,
                        help=f"arithmetic of the bound engine for local/reach and --diagnose (default {PRECISION})")
    parser.add_argument("--diagnose", action="store_true", help="where the intervals widen at step 0 (no chain)")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="with --diagnose: refuse a step bound XLA estimates above this (default: device memory)")
    parser.add_argument("--eager", action="store_true", help="the engine op by op (no whole-program XLA compile)")
    parser.add_argument("--symbols", type=int, default=None,
                        help="error symbols the zonotope keeps at each order reduction (default: the engine's)")
    parser.add_argument("--refine", choices=REFINE_SCOPES, default="normalisers",
                        help="which zonotope intervals CROWN tightens (compile_bounds' refine; default normalisers)")
    parser.add_argument("--keep-decision", action="store_true",
                        help="also the certified radius keeping the classifier's decision (see above)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    limit = None if args.memory_limit_gib is None else int(args.memory_limit_gib * 2 ** 30)
    if args.gmm is not None:
        apply_fn, params, noise, cond, x_T, lip, name, decision = gmm_model(args.gmm)
    elif args.dit is not None:
        apply_fn, params, noise, cond, x_T, lip, name, decision = dit_model(args.dit)
    else:
        apply_fn, params, noise, cond, x_T, lip, name, decision = digits_model(args.denoiser)
    print(f"model {name}, device {jax.devices()[0].platform}, engine precision {args.precision}", flush=True)
    if args.keep_decision and decision is None:
        raise SystemExit("--keep-decision: this model has no classifier")
    decision = decision if args.keep_decision else None
    rows = []
    # One chain's step map for every T: each engine method compiles its step bounds once for the whole run.
    chain = None
    caches = {e: {} for e in args.engine_methods}
    for steps in args.steps:
        schedule = ddim_schedule(noise, steps)
        chain = make_chain(apply_fn, params, cond, schedule, x_T) if chain is None else rechain(chain, schedule)
        if args.diagnose:
            for engine_method in args.engine_methods:
                for radius in args.radii:
                    try:
                        row = diagnose(chain, engine_method, radius, caches[engine_method], limit, args.precision,
                                       args.symbols)
                    except DiverifyError as err:
                        row = dict(engine_method=engine_method, radius=radius, error=str(err))
                    rows.append(dict(row, steps=steps))
                    print(json.dumps(to_jsonable(rows[-1])), flush=True)
            continue
        for method in args.methods:
            engine_methods = ["-"] if method == "global" else args.engine_methods
            for engine_method, radius in [(e, r) for e in engine_methods for r in args.radii]:
                start = time.perf_counter()
                done = []

                def step_done():  # one line per bounded step: a run cut short still says how far it got
                    done.append(time.perf_counter())
                    print(f"  step {len(done)}/{steps} bounded at {done[-1] - start:.1f} s", flush=True)
                try:
                    rep = lipschitz_report(chain, method, radius, lip, engine_method,
                                           compiled=caches.get(engine_method), precision=args.precision,
                                           decision=decision, eager=args.eager, symbols=args.symbols,
                                           refine=args.refine,
                                           progress=None if method == "global" else step_done)
                    row = dict(log10_certified=rep.log10_cumulative, empirical_lower=rep.empirical_lower,
                               chain_jacobian=rep.empirical_chain_jacobian,
                               log10_ratio=rep.log10_cumulative - float(np.log10(rep.empirical_lower)),
                               cond_certified=rep.cond_cumulative, log10_cond_certified=rep.log10_cond_cumulative,
                               seconds=rep.seconds, compile_seconds=rep.compile_seconds, error=None)
                    if decision is not None:
                        row.update(decision_label=rep.decision_label, boundary_distance=rep.distance,
                                   certified_radius=rep.certified_radius,
                                   log10_certified_radius=rep.log10_certified_radius,
                                   attack_radius=rep.empirical_radius,
                                   cond_certified_radius=rep.cond_certified_radius)
                except DiverifyError as err:
                    row = dict(error=str(err), seconds=time.perf_counter() - start)
                rows.append(dict(row, steps=steps, method=method, engine_method=engine_method, radius=radius,
                                 precision=None if method == "global" else args.precision,
                                 symbols=None if method == "global" else args.symbols,
                                 refine=None if method == "global" else args.refine))
                head = f"T={steps:>3} {method:>7} {engine_method:>14} r={radius:<7g}"
                if row["error"]:
                    print(f"{head} error: {row['error'][:200]}  ({row['seconds']:.1f} s)", flush=True)
                else:
                    compile_s = "" if row["compile_seconds"] is None else f", compile {row['compile_seconds']:.1f} s"
                    print(f"{head} certified 10^{row['log10_certified']:.2f}  empirical {row['empirical_lower']:.4g}  "
                          f"ratio 10^{row['log10_ratio']:.2f}  ({row['seconds']:.1f} s{compile_s})", flush=True)
                    if decision is not None:
                        log_r = row["log10_certified_radius"]
                        print(f"{'':>{len(head)}} decision (class {row['decision_label']}, boundary at "
                              f"{row['boundary_distance']:.4g}): certified radius "
                              f"{'none' if log_r is None else f'10^{log_r:.2f}'}, attack changes it above "
                              f"{row['attack_radius']}", flush=True)
    tag = "gmm" if args.gmm is not None else "dit" if args.dit is not None else "digits"
    path = args.out or OUT / f"lipschitz_{tag}{'_diagnose' if args.diagnose else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(dict(model=name, rows=rows)), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
