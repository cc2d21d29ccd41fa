"""A real denoiser made by our own code: a class-conditional UNet2DModel trained on scikit-learn's digits.

Data: the 1797 8x8 digit images of ``sklearn.datasets.load_digits`` (grey
levels 0..16) scaled to [-1, 1]. Model: a small ``UNet2DModel`` (no attention,
class embedding table of 10 rows). Training (Ho et al. 2020, the "simple"
loss): minimise E_{x0, y, t, z} || eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) z, t, y) - z ||^2
with optax AdamW; the saved weights are an exponential moving average of the
iterates. The result is written in diffusers format (``config.json`` +
``diffusion_pytorch_model.safetensors``, plus ``scheduler_config.json``), so
diffusers' ``UNet2DModel.from_pretrained`` loads it too.

The digits classifier is a multinomial logistic regression (scikit-learn) on
the 64 scaled pixels, saved as ``classifier.json`` (weights and bias), so that
its decision argmax(W x + b) is a plain affine map for the bound engine.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diverify.diffusion.schedulers import (SCHEDULER_CONFIG_NAME, NoiseSchedule, ddim_schedule,
                                           noise_schedule_from_config, sample)
from diverify.errors import DiverifyError

NUM_CLASSES = 10
IMAGE_SIZE = 8
CLASSIFIER_NAME = "classifier.json"
SCHEDULER_NAME = SCHEDULER_CONFIG_NAME

#: The diffusers config of the digits denoiser.
UNET_CONFIG = {
    "_class_name": "UNet2DModel",
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "add_attention": False,
    "num_class_embeds": NUM_CLASSES,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

#: The diffusers DDPMScheduler/DDIMScheduler config it is trained with.
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
}


def load_digits_dataset() -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 1, 8, 8) in [-1, 1] (float32) and labels (n,) of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return images, digits.target.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class DigitsClassifier:
    """Multinomial logistic regression on flattened scaled pixels: logits = x @ weight.T + bias."""

    weight: np.ndarray  # (10, 64)
    bias: np.ndarray  # (10,)
    test_accuracy: float

    def logits(self, images: Any) -> jax.Array:
        flat = jnp.reshape(images, (np.shape(images)[0], -1))
        return flat @ jnp.asarray(self.weight).T + jnp.asarray(self.bias)

    def predict(self, images: Any) -> np.ndarray:
        return np.asarray(jnp.argmax(self.logits(images), axis=-1))


def train_classifier(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> DigitsClassifier:
    """Fit the classifier on 75% of the data; ``test_accuracy`` is on the other 25%."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    flat = images.reshape(len(images), -1)
    x_train, x_test, y_train, y_test = train_test_split(flat, labels, test_size=0.25, random_state=seed,
                                                        stratify=labels)
    model = LogisticRegression(C=0.5, solver="newton-cg", max_iter=300).fit(x_train, y_train)
    return DigitsClassifier(model.coef_.astype(np.float32), model.intercept_.astype(np.float32),
                            float(model.score(x_test, y_test)))


def save_classifier(directory: str | Path, classifier: DigitsClassifier) -> Path:
    path = Path(directory) / CLASSIFIER_NAME
    path.write_text(json.dumps({"kind": "logistic_regression", "input": "8x8 pixels in [-1, 1], row-major",
                                "weight": classifier.weight.tolist(), "bias": classifier.bias.tolist(),
                                "test_accuracy": classifier.test_accuracy}))
    return path


def load_classifier(directory: str | Path) -> DigitsClassifier:
    path = Path(directory) / CLASSIFIER_NAME
    if not path.is_file():
        raise DiverifyError(f"digits classifier {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
        weight = np.asarray(data["weight"], np.float32)
        bias = np.asarray(data["bias"], np.float32)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DiverifyError(f"digits classifier {str(path)!r} is malformed: {err}") from None
    if weight.shape != (NUM_CLASSES, IMAGE_SIZE * IMAGE_SIZE) or bias.shape != (NUM_CLASSES,):
        raise DiverifyError(f"digits classifier {str(path)!r} has weight {weight.shape} and bias {bias.shape}, "
                            f"expected ({NUM_CLASSES}, {IMAGE_SIZE * IMAGE_SIZE}) and ({NUM_CLASSES},)")
    return DigitsClassifier(weight, bias, float(data.get("test_accuracy", float("nan"))))


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """Parameters (EMA) and the loss curve of :func:`train_digits_denoiser`."""

    params: Any
    losses: np.ndarray
    seconds: float


def eps_loss(apply_fn, params, x0, labels, t, z, noise: NoiseSchedule) -> jax.Array:
    """Mean squared error of the eps-prediction at x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z."""
    abar = jnp.take(jnp.asarray(noise.alphas_cumprod), t)[:, None, None, None]
    x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * z
    return jnp.mean((apply_fn(params, x_t, t, labels) - z) ** 2)


def train_digits_denoiser(steps: int, seed: int = 0, batch_size: int = 64, learning_rate: float = 3e-3,
                          ema_decay: float = 0.995, log_every: int = 0) -> TrainingRun:
    """Train the digits UNet for ``steps`` AdamW steps (warm-up then cosine decay); returns EMA params."""
    import optax
    from jax.flatten_util import ravel_pytree

    from diverify.models.diffusers_checkpoint import build_denoiser

    if steps < 1:
        raise DiverifyError(f"--steps must be positive, got {steps}")
    images, labels = load_digits_dataset()
    noise = noise_schedule_from_config(SCHEDULER_CONFIG)
    den = build_denoiser(UNET_CONFIG, seed=seed)
    warmup = min(200, max(1, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1),
                                                  learning_rate * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    # The optimiser and the average act on one flat vector: per-leaf updates of ~100 leaves
    # would triple the step's compile time on CPU.
    flat, unravel = ravel_pytree(den.params)
    opt_state = optimizer.init(flat)
    n_train = noise.num_train_timesteps

    @jax.jit
    def train_step(flat, ema, opt_state, x0, y, t, z):
        loss, grads = jax.value_and_grad(lambda f: eps_loss(den.apply, unravel(f), x0, y, t, z, noise))(flat)
        updates, opt_state = optimizer.update(grads, opt_state, flat)
        flat = optax.apply_updates(flat, updates)
        return flat, ema_decay * ema + (1 - ema_decay) * flat, opt_state, loss

    # Batches are drawn on the host: jax.random inside the step multiplies its compile time on CPU.
    rng = np.random.default_rng(seed)
    ema = flat
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        idx = rng.integers(0, len(images), batch_size)
        t = rng.integers(0, n_train, batch_size).astype(np.int32)
        z = rng.standard_normal((batch_size,) + images.shape[1:]).astype(np.float32)
        flat, ema, opt_state, loss = train_step(flat, ema, opt_state, images[idx], labels[idx], t, z)
        losses.append(loss)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {float(np.mean(np.asarray(losses[-log_every:]))):.4f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    losses = np.asarray(jnp.stack(losses))
    # With few steps the average has not forgotten the random start; use the iterate itself then.
    final = ema if steps >= 4 / (1 - ema_decay) else flat
    return TrainingRun(unravel(final), losses, time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class SampleAccuracy:
    """How often the classifier recognises DDIM samples as the class they were conditioned on."""

    accuracy: float
    per_class: tuple[float, ...]
    samples_per_class: int
    ddim_steps: int


def evaluate_samples(apply_fn, params, classifier: DigitsClassifier, samples_per_class: int = 20,
                     ddim_steps: int = 25, seed: int = 0) -> SampleAccuracy:
    """Generate ``samples_per_class`` images per digit with DDIM (eta = 0) and classify them."""
    noise = noise_schedule_from_config(SCHEDULER_CONFIG)
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), samples_per_class)
    x_T = np.random.default_rng(seed).standard_normal((len(labels), 1, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    images = sample(apply_fn, params, x_T, jnp.asarray(labels), ddim_schedule(noise, ddim_steps))
    correct = classifier.predict(images) == labels
    per_class = tuple(float(correct[labels == c].mean()) for c in range(NUM_CLASSES))
    return SampleAccuracy(float(correct.mean()), per_class, samples_per_class, ddim_steps)


@dataclasses.dataclass(frozen=True)
class TrainDenoiserResult:
    """What ``diverify train-denoiser`` reports."""

    out: str
    dataset: str
    steps: int
    seed: int
    train_seconds: float
    loss_first: float
    loss_last: float
    classifier_test_accuracy: float
    sample_accuracy: float
    per_class_accuracy: tuple[float, ...]
    samples_per_class: int
    ddim_steps: int
    num_parameters: int


def train_and_save(out: str | Path, steps: int, seed: int = 0, samples_per_class: int = 20, ddim_steps: int = 25,
                   log_every: int = 0) -> TrainDenoiserResult:
    """Train the digits denoiser and classifier, save both in ``out``, evaluate the samples' class accuracy."""
    from diverify.models.diffusers_checkpoint import load_denoiser, save_denoiser

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiverifyError(f"--out {str(out)!r} exists and is not a directory")
    run = train_digits_denoiser(steps, seed=seed, log_every=log_every)
    save_denoiser(out, UNET_CONFIG, run.params)
    (out / SCHEDULER_NAME).write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    images, labels = load_digits_dataset()
    classifier = train_classifier(images, labels, seed)
    save_classifier(out, classifier)
    den = load_denoiser(out)
    acc = evaluate_samples(den.eps, den.params, classifier, samples_per_class, ddim_steps, seed + 1)
    head = max(1, min(50, len(run.losses) // 10))
    return TrainDenoiserResult(
        out=str(out), dataset="digits", steps=steps, seed=seed, train_seconds=run.seconds,
        loss_first=float(run.losses[:head].mean()), loss_last=float(run.losses[-head:].mean()),
        classifier_test_accuracy=classifier.test_accuracy, sample_accuracy=acc.accuracy,
        per_class_accuracy=acc.per_class, samples_per_class=samples_per_class, ddim_steps=ddim_steps,
        num_parameters=int(sum(np.size(p) for p in jax.tree_util.tree_leaves(run.params))))
