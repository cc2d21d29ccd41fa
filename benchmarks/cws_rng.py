"""Cost of drawing CWS noise on this machine with each JAX PRNG implementation.

One sample of MiniLM's all-weights noise is ``jax.random.normal(fold_in(key, i), (n,))`` with
n = 10.65M (the noise coordinates the prompt reads); this times ``--draws`` such samples vmapped
under jit for threefry2x32 (the default), rbg and unsafe_rbg. Prints a table and writes JSON.
Timings are measurements, never asserted. Example::

    python benchmarks/cws_rng.py --draws 8
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coordinates", type=int, default=10_650_000)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "cws_rng.json"))
    args = parser.parse_args(argv)
    import jax
    import jax.numpy as jnp

    rows = []
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
        key = jax.random.key(0, impl=impl)
        draw = jax.jit(jax.vmap(lambda i: jnp.sum(jax.random.normal(jax.random.fold_in(key, i), (args.coordinates,)))))
        idx = jnp.arange(args.draws, dtype=jnp.uint32)
        draw(idx).block_until_ready()
        start = time.perf_counter()
        draw(idx + args.draws).block_until_ready()
        per_draw = (time.perf_counter() - start) / args.draws
        rows.append({"impl": impl, "seconds_per_draw": per_draw, "draws_per_second": 1 / per_draw})
        print(f"{impl:>14}  {per_draw * 1000:8.0f} ms per draw  {1 / per_draw:6.2f} draws/s", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"platform": jax.devices()[0].platform, "coordinates": args.coordinates, "rows": rows}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
