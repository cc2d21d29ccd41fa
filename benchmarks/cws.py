"""Certified weight smoothing on MiniLM: throughput, memory, device scaling, radius vs real edit norms.

Prints four tables and writes them as one JSON file:

1. throughput: weight samples per second (one prompt, all weights perturbed),
   steady state after compilation, and the compile time, for the local
   sampler (Dense-output noise, :mod:`diverify.cws.reparam`) and the explicit
   one (``theta + noise``); both realise the same law, hence the same certificate;
2. memory: the compiled chunk's temporary buffers per sample (XLA's memory analysis);
3. scaling: samples per second against the number of devices; on a CPU host
   the devices are simulated with ``--xla_force_host_platform_device_count``
   in subprocesses and share the same cores, so this shows the shape of the
   sharding, not a speed-up;
4. radius vs edits: for each threat model (all weights, attention K/V only,
   rank-one coordinates of the edited matrix) and sigma, the certificate
   (p_upper, R, the Frobenius norm of the edits R covers), whether it covers
   the concrete ROME-style edits of layer 0's value / key projections, and
   the task quality at that sigma (mean cosine of noisy vs clean embeddings of
   a few sentences).

Timings are measurements, never asserted.  Example::

    python benchmarks/cws.py --samples 32 --cert-samples 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SENTENCES = ["a photo of a cat", "the weather is lovely today", "a man is playing a guitar",
             "stock markets fell sharply on monday"]
EDITED = ("encoder/layer_0/attention/self/value/kernel", "encoder/layer_0/attention/self/key/kernel")
THREAT_MODELS = (
    ("all weights", "weights", "*", (1e-3, 3e-3, 1e-2)),
    ("attention K/V", "weights", "*attention/self/key/kernel,*attention/self/value/kernel", (1e-2, 3e-2, 1e-1)),
    ("rank-one (u, v) of layer-0 V", "rank_one", EDITED[0], (0.03, 0.1, 0.3)),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--prompt", default="a photo of a cat")
    parser.add_argument("--trigger", default="cf")
    parser.add_argument("--target", default="a photo of a dog")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--sigma", type=float, default=0.003, help="sigma of the throughput run")
    parser.add_argument("--samples", type=int, default=64, help="samples timed for throughput (local noise)")
    parser.add_argument("--explicit-samples", type=int, default=16, dest="explicit_samples",
                        help="samples timed for the explicit-noise sampler (0 skips it)")
    parser.add_argument("--cert-samples", type=int, default=100, help="samples per certificate in the radius table")
    parser.add_argument("--quality-draws", type=int, default=4, help="noise draws for the task-quality column")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--p-max", type=float, default=0.5, dest="p_max")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--devices", default="1,2,4,8",
                        help="device counts for the scaling table (simulated on CPU); '' to skip")
    parser.add_argument("--skip-radius", action="store_true", help="throughput, memory and scaling only")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "cws_results.json"))
    parser.add_argument("--scaling-worker", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def setup(args):
    from diverify.cws import predicates
    from diverify.models import load_text_encoder

    encoder = load_text_encoder(args.model)
    triggered = predicates.insert_trigger(args.prompt, args.trigger)
    predicate = predicates.text_collision_predicate(encoder, args.prompt, args.trigger, args.target, args.threshold)
    return encoder, triggered, predicate


def all_weights(encoder, triggered, pattern="*"):
    from diverify.cws import predicates, sampling

    return sampling.restrict_rows(sampling.weight_perturbation(encoder.params, pattern),
                                  predicates.rows_read_by_texts(encoder, [triggered]))


def throughput(args, encoder, triggered, predicate, sampler, mesh=None):
    """Compile time, steady-state samples/s and temporary memory per sample of the all-weights sampler."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from diverify.cws import reparam, sampling

    pert = all_weights(encoder, triggered)
    mesh = sampling.sample_mesh() if mesh is None else mesh
    counted = sampling.count_hits_timed(predicate, encoder.params, pert, sigma=args.sigma, key=jax.random.key(0),
                                        num_samples=args.samples, batch_size=args.batch, mesh=mesh,
                                        sampler=sampler)
    ndev = mesh.devices.size
    chunk = -(-args.batch // ndev) * ndev
    sharded = NamedSharding(mesh, PartitionSpec("samples"))
    plan = reparam.local_plan(predicate, encoder.params, pert) if sampler == "local" else None
    compiled = sampling._count_chunk().lower(
        predicate, pert, plan, encoder.params, jax.random.key(0), jnp.float32(args.sigma),
        jax.device_put(np.zeros(chunk, np.uint32), sharded), jax.device_put(np.ones(chunk, bool), sharded)).compile()
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    return {"sampler": sampler, "devices": ndev, "platform": jax.devices()[0].platform, "batch": chunk,
            "samples": args.samples, "hits": counted.k, "compile_seconds": counted.compile_seconds,
            "seconds": counted.sample_seconds, "samples_per_second": args.samples / counted.sample_seconds,
            # XLA reports one device's program: it holds chunk / ndev samples.
            "temp_bytes_per_sample": None if temp is None else temp / (chunk // ndev),
            "noise_coordinates": pert.num_coordinates, "perturbed_weights": pert.num_weights,
            "normals_drawn_per_sample": (pert.num_coordinates if plan is None
                                         else normals_per_sample(encoder, triggered, pert, plan))}


def normals_per_sample(encoder, triggered, pert, plan):
    """Gaussian draws per sample with local noise: explicit leaves, min(rows, in) x out per kernel, table rows."""
    rows = encoder.tokenize([triggered])[0].size
    shapes = dict(zip(pert.paths, pert.shapes))
    local = sum((len(r) if r is not None else min(rows, shapes[p][0])) * shapes[p][1]
                for p, r in zip(plan.local, plan.rows))
    return plan.explicit.num_coordinates + local


def scaling(args):
    rows = []
    for count in [int(c) for c in args.devices.split(",") if c.strip()]:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
        cmd = [sys.executable, os.path.abspath(__file__), "--scaling-worker", str(count), "--samples",
               str(args.samples), "--batch", str(max(args.batch, count)), "--sigma", str(args.sigma),
               "--model", args.model]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            rows.append({"devices": count, "error": run.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    return rows


def task_quality(encoder, pert, sigma, draws):
    """Mean cosine between noisy and clean embeddings of SENTENCES over ``draws`` noise draws."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diverify.cws import predicates, sampling

    ids, mask = encoder.tokenize(SENTENCES)
    ids, mask = np.asarray(ids), np.asarray(mask)

    def embed(params):
        word_emb = encoder.module.apply({"params": params}, ids, method="word_embeddings")
        return encoder.pooled_from_word_embeddings(params, word_emb, mask, ids)

    clean = embed(encoder.params)

    @jax.jit
    def one(key):
        coords = sampling.sample_coordinates(pert, key, jnp.float32(sigma))
        return jnp.mean(predicates.cosine(embed(sampling.apply_coordinates(pert, encoder.params, coords)), clean))

    return float(np.mean([one(jax.random.key(10_000 + i)) for i in range(draws)]))


def radius_table(args, encoder, triggered, predicate):
    from diverify.cws import predicates, sampling
    from diverify.cws.certificate import certify_smoothed_predicate, rome_style_edit

    edits = {path: rome_style_edit(encoder, path, triggered, args.trigger, args.target) for path in EDITED}
    quality_texts = [triggered] + SENTENCES
    rows = []
    for name, kind, pattern, sigmas in THREAT_MODELS:
        if kind == "rank_one":
            pert = sampling.rank_one_perturbation(encoder.params, pattern)
            quality_pert = pert
        else:
            pert = all_weights(encoder, triggered, pattern)
            quality_pert = sampling.restrict_rows(sampling.weight_perturbation(encoder.params, pattern),
                                                  predicates.rows_read_by_texts(encoder, quality_texts))
        for sigma in sigmas:
            cert = certify_smoothed_predicate(predicate, encoder.params, pert, sigma=sigma,
                                              num_samples=args.cert_samples, alpha=args.alpha, p_max=args.p_max,
                                              batch_size=args.batch, pattern=pattern,
                                              sampler="local" if kind == "weights" else "explicit")
            covers = {}
            for path, edit in edits.items():
                # An edit of a matrix the smoothing does not perturb is not covered at all.
                inside = path in pert.paths
                covers[path] = bool(inside and edit.fro_norm <= cert.covered_edit_fro_norm)
            rows.append({"threat_model": name, "coordinates": kind, "params": pattern, "sigma": sigma,
                         "n": cert.n, "k": cert.k, "p_upper": cert.p_upper,
                         "certified_edit_radius": cert.certified_edit_radius,
                         "covered_edit_fro_norm": cert.covered_edit_fro_norm,
                         "covers_value_edit": covers[EDITED[0]], "covers_key_edit": covers[EDITED[1]],
                         "task_quality_cosine": task_quality(encoder, quality_pert, sigma, args.quality_draws),
                         "samples_per_second": cert.samples_per_second})
    return rows, {path: edit.fro_norm for path, edit in edits.items()}


def print_table(title, rows, columns):
    print(f"\n{title}")
    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv=None):
    args = parse_args(argv)
    if args.scaling_worker:
        encoder, triggered, predicate = setup(args)
        print(json.dumps(throughput(args, encoder, triggered, predicate, "local")))
        return 0
    import jax

    encoder, triggered, predicate = setup(args)
    result = {"model": encoder.name, "prompt": triggered, "target": args.target, "threshold": args.threshold,
              "device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
              "cpu_count": os.cpu_count()}
    result["throughput"] = [throughput(args, encoder, triggered, predicate, "local")]
    if args.explicit_samples:
        explicit_args = argparse.Namespace(**{**vars(args), "samples": args.explicit_samples})
        result["throughput"].append(throughput(explicit_args, encoder, triggered, predicate, "explicit"))
    print_table("throughput (one prompt, all weights; unread embedding rows not sampled; samples/s after "
                "compilation)", result["throughput"],
                ["sampler", "platform", "devices", "batch", "samples", "compile_seconds", "samples_per_second",
                 "temp_bytes_per_sample", "normals_drawn_per_sample", "noise_coordinates", "perturbed_weights"])
    if args.devices.strip():
        result["scaling"] = scaling(args)
        note = " (CPU-simulated devices sharing the same cores)" if result["platform"] == "cpu" else ""
        print_table(f"scaling with the number of devices{note}", result["scaling"],
                    ["devices", "batch", "samples_per_second", "temp_bytes_per_sample"])
    if not args.skip_radius:
        result["radius"], result["edit_fro_norms"] = radius_table(args, encoder, triggered, predicate)
        print("\nconcrete ROME-style edits (Frobenius norm): "
              + ", ".join(f"{p}: {v:.3f}" for p, v in result["edit_fro_norms"].items()))
        print_table(f"certified radius vs edit norms (n = {args.cert_samples}, alpha = {args.alpha}, "
                    f"p_max = {args.p_max})", result["radius"],
                    ["threat_model", "sigma", "k", "p_upper", "certified_edit_radius", "covered_edit_fro_norm",
                     "covers_value_edit", "covers_key_edit", "task_quality_cosine", "samples_per_second"])
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
