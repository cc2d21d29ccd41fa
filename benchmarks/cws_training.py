"""CWS training on the digits denoiser: sigma vs task quality vs certified radius (issue 5 item 4, paper eq. 12).

Starting from the trained digits denoiser (``benchmarks/out/digits-denoiser``,
trained once with ``diverify train-denoiser`` if missing), fine-tune one copy
per training sigma with the noise-injected optax loop
(:func:`diverify.cws.training.make_smoothed_train_step`: minimise
``E_eps L(theta + eps)`` for the eps-prediction loss, noise on all weights);
``sigma_train = 0`` is the same fine-tune without noise, the control.  Every
model is then evaluated at every smoothing sigma:

* task quality of the *smoothed* model: DDIM samples, each with its own
  weight draw ``theta + N(0, sigma^2 I)``, classified by the digits
  classifier (fraction recognised as the requested class), and the same
  without weight noise;
* the CWS certificate against the malicious outcome "the sample requested
  as class C (fixed x_T) is classified as class T": ``k`` hits of ``n``,
  Clopper-Pearson ``p_upper`` and the certified edit radius ``R`` (l_2 over
  all weights) for ``p_max``.

Timings are measurements, never asserted.  Example (the RESULTS.md table)::

    python benchmarks/cws_training.py --steps 300 --sigmas 0.01 0.02 0.04 --cert-samples 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--denoiser", type=Path, default=OUT / "digits-denoiser")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.02, 0.04],
                        help="smoothing sigmas, used both to train and to evaluate (0 is always trained too)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per training sigma")
    parser.add_argument("--num-noise", type=int, default=1, dest="num_noise", help="weight draws per step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=10, dest="per_class",
                        help="DDIM samples per class for the quality columns")
    parser.add_argument("--ddim-steps", type=int, default=10, dest="ddim_steps")
    parser.add_argument("--cert-samples", type=int, default=200, dest="cert_samples")
    parser.add_argument("--requested", type=int, default=3, help="class C the certificate's sample is asked for")
    parser.add_argument("--target", type=int, default=8, help="class T that counts as the malicious outcome")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--p-max", type=float, default=0.5, dest="p_max")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT / "cws_training.json")
    return parser.parse_args(argv)


def load_base(directory: Path):
    from diverify.diffusion import digits
    from diverify.models.diffusers_checkpoint import load_denoiser

    if not (directory / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "diverify.cli", "train-denoiser", "--dataset", "digits",
                        "--out", str(directory), "--json"], check=True)
    return load_denoiser(directory), digits.load_classifier(directory)


def fine_tune(den, params, sigma, args, step_fn, optimizer):
    """``args.steps`` steps of the smoothed loss at ``sigma`` (0: plain fine-tune), batches drawn on the host."""
    import jax
    import numpy as np

    from diverify.diffusion import digits

    images, labels = digits.load_digits_dataset()
    rng = np.random.default_rng(args.seed + 1)
    opt_state = optimizer.init(params)
    key = jax.random.key(args.seed + 2)
    losses = []
    for i in range(args.steps):
        idx = rng.integers(0, len(images), args.batch)
        t = rng.integers(0, digits.SCHEDULER_CONFIG["num_train_timesteps"], args.batch).astype(np.int32)
        z = rng.standard_normal((args.batch,) + images.shape[1:]).astype(np.float32)
        params, opt_state, loss = step_fn[sigma](params, opt_state, (images[idx], labels[idx], t, z),
                                                 jax.random.fold_in(key, i))
        losses.append(loss)
        if (i + 1) % 25 == 0:
            recent = float(np.mean(np.asarray(losses[-25:])))
            print(f"  sigma_train={sigma:g} step {i + 1}/{args.steps} loss {recent:.4f}",
                  file=sys.stderr, flush=True)
    return params, float(np.mean(np.asarray(losses[-50:])))


def make_evaluators(den, classifier, pert, args):
    """Jitted ``accuracy(params, sigma)`` and the certificate's predicate, built once (compiled once)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diverify.cws.predicates import class_is
    from diverify.cws.sampling import apply_coordinates, sample_coordinates
    from diverify.diffusion import digits
    from diverify.diffusion.schedulers import ddim_schedule, noise_schedule_from_config, sample

    schedule = ddim_schedule(noise_schedule_from_config(digits.SCHEDULER_CONFIG), args.ddim_steps)
    labels = np.repeat(np.arange(digits.NUM_CLASSES, dtype=np.int32), args.per_class)
    x_T = np.random.default_rng(args.seed + 3).standard_normal((len(labels), 1, 8, 8)).astype(np.float32)
    keys = jax.random.split(jax.random.key(args.seed + 4), len(labels))

    @jax.jit
    def generate(params, sigma):
        def one(key, x, y):
            noisy = apply_coordinates(pert, params, sample_coordinates(pert, key, sigma))
            return sample(den.eps, noisy, x[None], y[None], schedule)[0]

        return jax.vmap(one)(keys, x_T, labels)

    def accuracy(params, sigma):
        """Fraction of DDIM samples recognised as the requested class, one weight draw per sample."""
        return float(np.mean(classifier.predict(generate(params, jnp.float32(sigma))) == labels))

    cert_x_T = jnp.asarray(np.random.default_rng(args.seed + 5).standard_normal((1, 1, 8, 8)), jnp.float32)
    label = jnp.asarray([args.requested], jnp.int32)
    # "The sample requested as class C (fixed x_T) is classified as class T".
    predicate = class_is(lambda p: classifier.logits(sample(den.eps, p, cert_x_T, label, schedule)), args.target)
    return accuracy, predicate


def main(argv=None):
    args = parse_args(argv)
    import jax
    import numpy as np
    import optax

    from diverify.cws.certificate import certify_smoothed_predicate
    from diverify.cws.sampling import weight_perturbation
    from diverify.cws.training import make_smoothed_train_step
    from diverify.diffusion import digits
    from diverify.diffusion.schedulers import noise_schedule_from_config

    den, classifier = load_base(args.denoiser)
    pert = weight_perturbation(den.params)
    noise = noise_schedule_from_config(digits.SCHEDULER_CONFIG)
    optimizer = optax.adam(args.lr)

    def loss_fn(params, batch):
        x0, y, t, z = batch
        return digits.eps_loss(den.apply, params, x0, y, t, z, noise)

    train_sigmas = [0.0] + [s for s in args.sigmas if s > 0]
    # One loss_fn / optimizer object: every sigma shares the compiled step.
    step_fn = {s: make_smoothed_train_step(loss_fn, optimizer, pert, s, args.num_noise) for s in train_sigmas}
    print(f"digits denoiser, {pert.num_weights} weights, {args.steps} fine-tuning steps per sigma, "
          f"device {jax.devices()[0].platform}", flush=True)
    models = {"base (no fine-tune)": den.params}
    train_rows = []
    for s in train_sigmas:
        start = time.perf_counter()
        params, loss = fine_tune(den, den.params, s, args, step_fn, optimizer)
        train_rows.append({"sigma_train": s, "final_loss": loss, "seconds": time.perf_counter() - start})
        print(f"trained sigma_train={s:g}: smoothed loss {loss:.4f}, {train_rows[-1]['seconds']:.0f} s", flush=True)
        models[f"sigma_train={s:g}"] = params

    accuracy, predicate = make_evaluators(den, classifier, pert, args)
    rows = []
    header = ("model", "sigma", "clean_acc", "smoothed_acc", "k", "n", "p_upper", "radius", "cert_s")
    print("  ".join(f"{h:>20}" if i == 0 else f"{h:>12}" for i, h in enumerate(header)), flush=True)
    for name, params in models.items():
        clean = accuracy(params, 0.0)
        for s in [x for x in args.sigmas if x > 0]:
            acc = accuracy(params, s)
            cert = certify_smoothed_predicate(predicate, params, pert, sigma=s, num_samples=args.cert_samples,
                                              alpha=args.alpha, p_max=args.p_max, seed=args.seed + 6,
                                              batch_size=50)
            rows.append({"model": name, "sigma": s, "clean_accuracy": clean, "smoothed_accuracy": acc,
                         "k": cert.k, "n": cert.n, "p_upper": cert.p_upper,
                         "certified_edit_radius": cert.certified_edit_radius, "cert_seconds": cert.seconds})
            values = (name, s, clean, acc, cert.k, cert.n, cert.p_upper, cert.certified_edit_radius, cert.seconds)
            print("  ".join(f"{v:>20}" if i == 0 else (f"{v:>12.4g}" if isinstance(v, float) else f"{v:>12}")
                            for i, v in enumerate(values)), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"weights": pert.num_weights, "steps": args.steps, "num_noise": args.num_noise, "lr": args.lr,
              "requested_class": args.requested, "target_class": args.target, "alpha": args.alpha,
              "p_max": args.p_max, "per_class": args.per_class, "ddim_steps": args.ddim_steps,
              "training": train_rows, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
