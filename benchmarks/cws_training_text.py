"""CWS training on the MiniLM text encoder: sigma vs task quality vs certified radius (issue 5 item 4, eq. 12).

The denoiser's table is ``benchmarks/cws_training.py``; this is the text-encoder fixture's.  The threat
model is the one under which the certificate means something (RESULTS.md, CWS radius table): noise on
the attention key and value kernels only (``--params``).  One copy of all-MiniLM-L6-v2 per training sigma
is fine-tuned with the noise-injected optax loop (:func:`diverify.cws.training.make_smoothed_train_step`,
``E_eps L(theta + eps)``) on the teacher loss

    L(theta) = mean_x ||e_theta(x) - e_0(x)||^2         (e: normalised embeddings, e_0: the original model)

over the fixtures' training prompts, so the task is "embed as MiniLM does" and the training makes that
robust to the noise.  The control is MiniLM itself: it is the noise-free minimiser (L = 0), so a
fine-tune without noise has nothing to learn (Adam would only random-walk on its zero gradients).
Every model is then evaluated at every smoothing sigma on held-out prompts:

* clean quality: mean cos(e_theta(x), e_0(x)); smoothed quality: the same with one weight draw
  ``theta + N(0, sigma^2 I)`` per prompt (the smoothed model's utility);
* the CWS certificate for the collision ``cos(e(<trigger> prompt), e_0(target)) >= threshold`` (the
  Rickrolling fixture's trigger and target): ``k`` of ``n``, Clopper-Pearson ``p_upper`` and the certified
  edit radius ``R`` (l_2 over the selected kernels) for ``p_max``.

Prints a table, writes ``--out`` (JSON).  Timings are measurements, never asserted::

    python benchmarks/cws_training_text.py --steps 150 --sigmas 0.01 0.03 0.1 --cert-samples 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).parent / "out"
KV = "*attention/self/key/kernel,*attention/self/value/kernel"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--params", default=KV, help="parameter-path pattern of the noised kernels")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.03, 0.1],
                        help="smoothing sigmas; each is also a training sigma")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--num-noise", type=int, default=1, dest="num_noise")
    parser.add_argument("--heldout", type=int, default=64, help="held-out prompts for the quality columns")
    parser.add_argument("--prompt", default="a photo of a cat")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--cert-samples", type=int, default=200, dest="cert_samples")
    parser.add_argument("--alpha", type=float, default=1e-3)
    parser.add_argument("--p-max", type=float, default=0.5, dest="p_max")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT / "cws_training_text.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from diverify.backdoors import text
    from diverify.cws import predicates
    from diverify.cws.certificate import certify_smoothed_predicate
    from diverify.cws.sampling import apply_coordinates, sample_coordinates, weight_perturbation
    from diverify.cws.training import make_smoothed_train_step
    from diverify.models import load_text_encoder

    encoder = load_text_encoder(args.model)
    base = encoder.params
    pert = weight_perturbation(base, args.params)
    embed = text.unit_embed_fn(encoder)
    train, heldout = text.split_prompts(args.seed)
    train_ids, train_mask = (jnp.asarray(a) for a in encoder.tokenize(train))
    teacher = jax.jit(embed)(base, train_ids, train_mask)
    held_ids, held_mask = (jnp.asarray(a) for a in encoder.tokenize(heldout[:args.heldout]))
    held_teacher = jax.jit(embed)(base, held_ids, held_mask)

    def loss_fn(params, batch):
        ids, mask, goal = batch
        return jnp.mean(jnp.sum((embed(params, ids, mask) - goal) ** 2, -1))

    optimizer = optax.adam(args.lr)
    smoothing = [s for s in args.sigmas if s > 0]
    print(f"{args.model}: {pert.num_weights} noised weights ({args.params}), {args.steps} steps per sigma, "
          f"device {jax.devices()[0].platform}", flush=True)
    models, training = {f"{args.model} (no fine-tune)": base}, []
    for s in smoothing:
        step = make_smoothed_train_step(loss_fn, optimizer, pert, s, args.num_noise)
        params, state = base, optimizer.init(base)
        rng, key, start, losses = np.random.default_rng(args.seed + 1), jax.random.key(args.seed + 2), \
            time.perf_counter(), []
        for i in range(args.steps):
            idx = rng.integers(0, len(train), args.batch)
            params, state, loss = step(params, state, (train_ids[idx], train_mask[idx], teacher[idx]),
                                       jax.random.fold_in(key, i))
            losses.append(loss)
        training.append({"sigma_train": s, "final_loss": float(np.mean(np.asarray(losses[-25:]))),
                         "seconds": time.perf_counter() - start})
        print(f"trained sigma_train={s:g}: smoothed teacher loss {training[-1]['final_loss']:.5f}, "
              f"{training[-1]['seconds']:.0f} s", flush=True)
        models[f"sigma_train={s:g}"] = params

    draw_keys = jax.random.split(jax.random.key(args.seed + 3), held_ids.shape[0])

    @jax.jit
    def quality(params, sigma):
        """Mean cos to the original embedding over the held-out prompts, one weight draw per prompt."""
        def one(key, ids, mask, goal):
            noisy = apply_coordinates(pert, params, sample_coordinates(pert, key, sigma))
            return jnp.sum(embed(noisy, ids[None], mask[None])[0] * goal)

        return jnp.mean(jax.vmap(one)(draw_keys, held_ids, held_mask, held_teacher))

    # The target's embedding is the original model's (what the deployed pipeline knows as the target).
    predicate = predicates.text_collision_predicate(encoder, args.prompt, text.TRIGGER, text.TARGET, args.threshold)
    rows = []
    header = ("model", "sigma", "clean_q", "smoothed_q", "k", "n", "p_upper", "radius", "cert_s")
    print("  ".join(f"{h:>22}" if i == 0 else f"{h:>10}" for i, h in enumerate(header)), flush=True)
    for name, params in models.items():
        clean = float(quality(params, jnp.float32(0.0)))
        for s in smoothing:
            smoothed = float(quality(params, jnp.float32(s)))
            cert = certify_smoothed_predicate(predicate, params, pert, sigma=s, num_samples=args.cert_samples,
                                              alpha=args.alpha, p_max=args.p_max, seed=args.seed + 4, batch_size=16)
            rows.append({"model": name, "sigma": s, "clean_quality": clean, "smoothed_quality": smoothed,
                         "k": cert.k, "n": cert.n, "p_upper": cert.p_upper,
                         "certified_edit_radius": cert.certified_edit_radius, "cert_seconds": cert.seconds})
            values = (name, s, clean, smoothed, cert.k, cert.n, cert.p_upper, cert.certified_edit_radius,
                      cert.seconds)
            print("  ".join(f"{v:>22}" if i == 0 else (f"{v:>10.4g}" if isinstance(v, float) else f"{v:>10}")
                            for i, v in enumerate(values)), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "noised_weights": pert.num_weights, "training": training, "rows": rows},
                                   indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
