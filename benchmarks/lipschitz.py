"""Lipschitz bounds of the reverse DDIM chain on the trained digits denoiser (or a DiT-S/2-sized model).

For each T: the global product, the local (balls) and reach (boxes) engine
bounds and the empirical lower bound, with seconds; the ratio of each sound
whole-chain number to the empirical one. A method the engine cannot bound
for this model is reported with its error, not skipped.

    python benchmarks/lipschitz.py                       # trains benchmarks/out/digits-denoiser once
    python benchmarks/lipschitz.py --steps 10 --methods global
    python benchmarks/lipschitz.py --dit --steps 50 --methods local   # DiT-S/2 random weights (GPU)
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

from diverify.diffusion.schedulers import ddim_schedule, noise_schedule, read_noise_schedule
from diverify.errors import DiverifyError
from diverify.lipschitz import lipschitz_report, make_chain, unet_eps_lipschitz
from diverify.models.diffusers_checkpoint import build_denoiser, load_denoiser
from diverify.results import to_jsonable

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
    return den, noise, jax.nn.one_hot(jnp.array([3]), 10), x_T, (lambda t: bounds)


def dit_model():
    den = build_denoiser(DIT_S2, seed=0)
    noise = noise_schedule(clip_sample=False)
    x_T = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 32, 32)), jnp.float32)
    return den, noise, jnp.array([3]), x_T, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--denoiser", type=Path, default=OUT / "digits-denoiser")
    parser.add_argument("--dit", action="store_true", help="DiT-S/2-sized random-weight model instead")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--methods", nargs="+", default=["global", "local", "reach"])
    parser.add_argument("--radius", type=float, default=1e-3)
    parser.add_argument("--engine-method", default="crown-forward")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    den, noise, cond, x_T, lip = dit_model() if args.dit else digits_model(args.denoiser)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(den.params))
    print(f"model {den.class_name}, {n_params} parameters, device {jax.devices()[0].platform}")
    rows = []
    for steps in args.steps:
        chain = make_chain(den.eps, den.params, cond, ddim_schedule(noise, steps), x_T)
        for method in args.methods:
            start = time.perf_counter()
            try:
                rep = lipschitz_report(chain, method, args.radius, lip, args.engine_method)
                row = dict(steps=steps, method=method, log10_certified=rep.log10_cumulative,
                           empirical_lower=rep.empirical_lower, chain_jacobian=rep.empirical_chain_jacobian,
                           log10_ratio=rep.log10_cumulative - float(np.log10(rep.empirical_lower)),
                           cond_certified=rep.cond_cumulative, seconds=rep.seconds, error=None)
            except DiverifyError as err:
                row = dict(steps=steps, method=method, error=str(err), seconds=time.perf_counter() - start)
            rows.append(row)
            if row["error"]:
                print(f"T={steps:>3} {method:>7}  error: {row['error'][:110]}  ({row['seconds']:.1f} s)", flush=True)
            else:
                print(f"T={steps:>3} {method:>7}  certified 10^{row['log10_certified']:.2f}  "
                      f"empirical {row['empirical_lower']:.4g}  ratio 10^{row['log10_ratio']:.2f}  "
                      f"({row['seconds']:.1f} s)", flush=True)
    path = args.out or OUT / ("lipschitz_dit.json" if args.dit else "lipschitz.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(dict(model=den.class_name, parameters=n_params, radius=args.radius,
                                                engine_method=args.engine_method, rows=rows)), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
