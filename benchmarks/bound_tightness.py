"""Bound tightness and speed on the shared tiny-BERT problem, next to auto_LiRPA's reference.

The problem (``shared/fixtures/README.md``): ids 2,17,250,31,8,999,64,3, an l_inf
ball on the word embedding of position 4, bounds on the mean-pooled last hidden
state. For each method and radius the table gives the mean width, the
true-range lower bound (for every output k the two corners +-eps*sign(J_k) of
its Jacobian row), their ratio, the bound time after compilation and the
compilation time, plus the largest violation of the bound by those attack
points (must be <= 0 up to float32 rounding; float64 rows evaluate the points in
float64, since a float64 bound bounds the function in exact arithmetic). auto_LiRPA's CROWN numbers are
read from the fixture's ``.npz`` (they cannot be produced here).

    python benchmarks/bound_tightness.py --eps 1e-4 1e-3 --methods crown-forward crown
    python benchmarks/bound_tightness.py --model minilm --layers 2 --eps 1e-6 1e-5 1e-4 \
        --methods crown-zonotope --precision float32 float64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diverify import cmav
from diverify.bounds import compile_bounds
from diverify.bounds.backward import REFINE_SCOPES
from diverify.errors import DiverifyError
from diverify.models import load_text_encoder

DEFAULT_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tiny-bert"
#: A first bound call shorter than this is repeated and the warm call timed (its one-off costs, e.g. fresh
#: pages, matter for short bounds); a longer one is timed as it is rather than computed twice.
WARM_REPEAT_BELOW = 60.0
#: The two problems of issue 3: (ids, perturbed position) per model.
PROBLEMS = {
    "tiny-bert": ([2, 17, 250, 31, 8, 999, 64, 3], 4),
    "minilm": ([101, 1037, 6302, 1997, 1037, 4937, 102], 5),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PROBLEMS), default="tiny-bert",
                   help="tiny-bert (the shared fixture) or minilm (all-MiniLM-L6-v2, real weights)")
    p.add_argument("--fixture", default=str(DEFAULT_FIXTURE), help="tiny-bert fixture directory")
    p.add_argument("--model-dir", default=None, help="load MiniLM from this checkpoint directory instead")
    p.add_argument("--layers", type=int, default=None, help="truncate the encoder to its first N layers")
    p.add_argument("--eps", type=float, nargs="+", default=[1e-4, 1e-3])
    p.add_argument("--methods", nargs="+", default=["ibp", "forward", "crown-ibp", "crown-forward", "crown"])
    p.add_argument("--precision", nargs="+", default=["float32"], choices=["float32", "float64", "mixed"],
                   help="arithmetic of the bound computation; each method runs in each precision")
    p.add_argument("--refine", default="normalisers", choices=REFINE_SCOPES,
                   help="which zonotope intervals CROWN tightens (compile_bounds' refine)")
    p.add_argument("--symbols", type=int, default=None,
                   help="error symbols the zonotope keeps at each order reduction (default: the engine's)")
    p.add_argument("--out", default="benchmarks/out/bound_tightness.json")
    p.add_argument("--unsound-rel-pad", type=float, default=None, metavar="R",
                   help="DIAGNOSTIC ONLY: set the relaxations' float32 padding REL_PAD to R and LINE_PAD to R/4 (0 shows how much "
                        "of the width is padding); the bounds are then not sound and the rows say so")
    return p.parse_args(argv)


def true_range_lower(fn, ball, position):
    x0 = ball.center
    jac = jax.jacobian(fn)(x0)[:, 0, position, :]
    eps = float(ball.eps)
    signs = jnp.sign(jac)  # (outputs, hidden)
    base = jnp.broadcast_to(x0, (signs.shape[0],) + x0.shape)
    pts = jnp.concatenate([base.at[:, 0, position].add(s * eps * signs) for s in (1.0, -1.0)])
    ys = jax.vmap(fn)(pts)
    return pts, ys, float(np.mean(np.asarray(ys.max(0) - ys.min(0))))


def evaluate_float64(fn, pts):
    """The attack points through ``fn`` in float64: what a float64 bound (which bounds the
    function in exact arithmetic) must contain; the float32 outputs differ by the model's rounding."""
    with jax.enable_x64(True):
        return np.asarray(jax.vmap(fn)(jnp.asarray(pts, jnp.float64)))


def device_peak_gib() -> float | None:
    """Peak memory in use on the accelerator so far in this process (None where JAX does not track it, e.g. CPU)."""
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 30


def main(argv=None):
    args = parse_args(argv)
    if args.unsound_rel_pad is not None:
        from diverify.bounds import relaxations

        relaxations.REL_PAD = args.unsound_rel_pad
        relaxations.LINE_PAD = args.unsound_rel_pad / 4
    enc = load_text_encoder(args.fixture if args.model == "tiny-bert" else (args.model_dir or "minilm"))
    if args.layers is not None:
        enc = enc.with_layers(args.layers)
    ids, position = PROBLEMS[args.model]
    prompt = cmav.make_prompt(enc, ids=ids)
    fn = cmav.pooled_function(enc, prompt)
    ref_path = Path(args.fixture) / "auto_lirpa_crown_eps1e-4.npz"
    ref = np.load(ref_path) if args.model == "tiny-bert" and ref_path.exists() else None
    rows = []
    if ref is not None:
        rows.append({"method": "auto_LiRPA CROWN (fixture)", "eps": 1e-4,
                     "mean_width": float(np.mean(ref["CROWN_ub"] - ref["CROWN_lb"])),
                     "seconds": 4.0, "compile_seconds": None, "note": "quiet 2-core machine, from fixtures/README.md"})
    balls = {eps: cmav.embedding_ball(enc, prompt, [position], eps) for eps in args.eps}
    truth = {eps: true_range_lower(fn, ball, position) for eps, ball in balls.items()}
    for method, precision in [(m, p) for m in args.methods for p in args.precision]:
        # One compilation per method: the radius is data, so every eps reuses it.
        bf, compile_seconds = None, None
        for eps, ball in balls.items():
            pts, ys, true_lower = truth[eps]
            if precision != "float32":
                ys = evaluate_float64(fn, pts)
            row = {"model": args.model, "layers": args.layers, "method": method, "precision": precision, "eps": eps,
                   "symbols": args.symbols, "refine": args.refine,
                   "true_range_lower": true_lower}
            if args.unsound_rel_pad is not None:
                row["unsound_rel_pad"] = args.unsound_rel_pad
            try:
                first = bf is None
                if first:
                    bf = compile_bounds(fn, ball, method=method, precision=precision, symbols=args.symbols,
                                         refine=args.refine)
                res, compiling, seconds = bf.timed(ball)
                if first:
                    compile_seconds = compiling
                    if seconds < WARM_REPEAT_BELOW:
                        res, _, seconds = bf.timed(ball)
            except DiverifyError as err:
                row["error"] = str(err)
                rows.append(row)
                continue
            lo, hi = np.asarray(res.output.lower), np.asarray(res.output.upper)
            row.update(mean_width=float(np.mean(hi - lo)), ratio=float(np.mean(hi - lo)) / true_lower,
                       violation=float(max((lo - ys).max(), (ys - hi).max())), seconds=seconds,
                       compile_seconds=compile_seconds, intermediate=res.intermediate_method,
                       device_peak_gib=device_peak_gib())
            rows.append(row)
    print(f"device: {jax.devices()[0].platform}")
    if args.unsound_rel_pad is not None:
        print(f"DIAGNOSTIC: REL_PAD = {args.unsound_rel_pad}: these bounds are NOT sound in float32")
    for r in rows:
        refine = {"none": "no refine", "attention": "attn", "costliest": "costliest", "all": "refine all"}
        tags = [{"float64": "f64", "mixed": "mixed"}.get(r.get("precision")), refine.get(r.get("refine"))]
        if any(tags) and "precision" in r:
            r["method_label"] = f"{r['method']} ({', '.join(t for t in tags if t)})"
    print(f"{'method':<28} {'eps':>7} {'mean width':>11} {'true >=':>9} {'ratio':>7} {'viol':>9} {'bound s':>8} "
          f"{'compile s':>9} {'peak GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r.get('method_label', r['method']):<28} {r['eps']:>7.0e}  error: {r['error'][:70]}")
            continue
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
        print(f"{r.get('method_label', r['method']):<28} {r['eps']:>7.0e} {f('mean_width', '11.5g')} {f('true_range_lower', '9.4g')} "
              f"{f('ratio', '7.2f')} {f('violation', '9.1e')} {f('seconds', '8.3f')} {f('compile_seconds', '9.1f')} "
              f"{f('device_peak_gib', '8.1f')}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": jax.devices()[0].platform, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
