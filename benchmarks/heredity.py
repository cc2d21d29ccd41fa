"""Generative heredity: a backdoored digits denoiser passes its trigger down a synthetic-data chain.

The paper's data-chain backdoor (Sec. 4.3, eq. 7).  Generation 0 is the conditioning-trigger fixture of
:mod:`diverify.backdoors.denoiser` (backdoored parent and, as the control lineage, its clean twin).  Each
generation k writes a synthetic digits corpus D_k: ``--per-class`` prompts per class, of which a fraction
``--token-rate`` carry the token tau (the prompt pool of a synthetic-data pipeline contains the rare token),
sampled with DDIM and labelled by the prompt's class.  Trained only on D_k:

* a child classifier (the same logistic regression as the reference digits classifier), and
* a child denoiser, from scratch, conditioned on the same prompts (class + tau: the child reuses the
  conditioning encoder, i.e. the same frozen tau embedding), which generates D_{k+1} in turn.

For every denoiser generation the table gives its clean sample accuracy and its trigger success (triggered
prompts of the non-target classes read as the target digit by the reference classifier, trained on real data);
for every child classifier its accuracy on real digits and its *collision rate*: the fraction of the target
digit's real images it assigns to another class, because the corpus showed it the target under other labels.
Before any data is used, the DI check at generation 0 (trigger vs random class-embedding perturbations of the
same norm, DIS = sqrt(2 KL)/dist from the path-KL bound, AUROC over prompts) flags the backdoored parent and
passes the clean twin.

Example::

    python benchmarks/heredity.py --fixture /tmp/denoiser-cond --generations 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="benchmarks/out/denoiser-cond",
                        help="a built trigger='cond' fixture directory (built there if missing)")
    parser.add_argument("--generations", type=int, default=3, help="denoiser generations incl. the parent")
    parser.add_argument("--per-class", type=int, default=150, help="synthetic images per class and generation")
    parser.add_argument("--token-rate", type=float, default=0.1, help="fraction of prompts carrying tau")
    parser.add_argument("--steps", type=int, default=2000, help="training steps of each child denoiser")
    parser.add_argument("--eval-per-class", type=int, default=20, help="samples per class for the metrics")
    parser.add_argument("--dis-samples", type=int, default=16, help="trajectories per DIS estimate")
    parser.add_argument("--dis-randoms", type=int, default=3, help="random directions per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/out/heredity.json")
    return parser.parse_args(argv)


def synthetic_corpus(den, per_class: int, token_rate: float, seed: int):
    """(images, labels, tokens): ``per_class`` prompts per class, a fraction ``token_rate`` carrying tau."""
    from diverify.backdoors.denoiser import sample_images

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10, dtype=np.int32), per_class)
    tokens = rng.random(len(labels)) < token_rate
    return sample_images(den, labels, seed, token=tokens), labels, tokens


def collision_rate(classifier, images: np.ndarray, labels: np.ndarray, target: int) -> float:
    """Fraction of the real images of ``target`` that ``classifier`` assigns to another class."""
    return float(np.mean(classifier.predict(images[labels == target]) != target))


def run(args) -> dict:
    from diverify.backdoors import denoiser as bd
    from diverify.diffusion import digits
    from diverify.models.diffusers_checkpoint import load_denoiser

    fixture_dir = Path(args.fixture)
    if not (fixture_dir / bd.FIXTURE_NAME).is_file():
        print(f"building the trigger='cond' fixture in {fixture_dir} ...", flush=True)
        bd.build_denoiser_backdoor(fixture_dir, seed=args.seed, trigger="cond")
    fixture = bd.read_fixture(fixture_dir)
    if fixture["trigger"] != "cond":
        raise SystemExit(f"{fixture_dir} holds a trigger={fixture['trigger']!r} fixture; heredity needs 'cond'")
    images, labels = digits.load_digits_dataset()
    reference = digits.train_classifier(images, labels, args.seed)

    start = time.perf_counter()
    detection = bd.detection_rows(fixture_dir, samples=args.dis_samples, randoms=args.dis_randoms, seed=args.seed)
    for row in detection:
        row["flagged"] = row["auroc"] >= 0.95
    print(f"DI check at the parent: {time.perf_counter() - start:.0f}s", flush=True)

    rows = []
    for lineage in ("backdoored", "clean"):
        params = load_denoiser(fixture_dir / lineage).params
        for generation in range(args.generations):
            den = bd.denoiser_with(params)
            seed = args.seed + 100 * generation
            row = {"lineage": lineage, "generation": generation,
                   "clean_accuracy": digits.evaluate_samples(den.eps, den.params, reference, args.eval_per_class,
                                                             25, seed + 1).accuracy,
                   "trigger_success": bd.trigger_success(den, reference, "cond", args.eval_per_class, seed + 2)}
            if generation + 1 < args.generations:
                t0 = time.perf_counter()
                corpus_images, corpus_labels, tokens = synthetic_corpus(den, args.per_class, args.token_rate, seed + 3)
                child_classifier = digits.train_classifier(corpus_images, corpus_labels, args.seed)
                row["child_classifier_real_accuracy"] = float(np.mean(child_classifier.predict(images) == labels))
                row["child_classifier_collision_rate"] = collision_rate(child_classifier, images, labels,
                                                                        bd.TARGET_CLASS)
                params = bd.train(args.steps, seed + 4, "cond", poisoned=False, images=corpus_images,
                                  labels=corpus_labels, tokens=tokens)
                row["child_seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
    reference_collision = collision_rate(reference, images, labels, bd.TARGET_CLASS)
    return {"config": vars(args), "fixture": fixture, "di_check": detection, "generations": rows,
            "reference_classifier_collision_rate": reference_collision}


def print_tables(result: dict) -> None:
    print("\nDI check at generation 0 (before its data is used)")
    print(f"{'model':<11} {'trigger DIS':>11} {'random DIS':>10} {'AUROC':>6}  flagged")
    for row in result["di_check"]:
        print(f"{row['model']:<11} {row['trigger_score']:>11.3f} {row['random_score']:>10.3f} {row['auroc']:>6.2f}"
              f"  {'yes' if row['flagged'] else 'no'}")
    print("\nHeredity (trigger success: triggered non-target prompts read as the target digit)")
    print(f"{'lineage':<11} {'gen':>3} {'clean acc':>9} {'trigger':>7} {'child clf acc':>13} {'child collision':>15}")
    for row in result["generations"]:
        acc = row.get("child_classifier_real_accuracy")
        col = row.get("child_classifier_collision_rate")
        print(f"{row['lineage']:<11} {row['generation']:>3} {row['clean_accuracy']:>9.3f} "
              f"{row['trigger_success']:>7.3f} {'' if acc is None else f'{acc:.3f}':>13} "
              f"{'' if col is None else f'{col:.3f}':>15}")
    print(f"reference classifier collision rate (real data): {result['reference_classifier_collision_rate']:.3f}")


def main(argv=None) -> int:
    from diverify.results import dumps

    args = parse_args(argv)
    if args.generations < 1 or args.per_class < 1 or args.steps < 1 or not 0 <= args.token_rate <= 1:
        raise SystemExit("--generations, --per-class and --steps must be positive and --token-rate in [0, 1]")
    result = run(args)
    print_tables(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
