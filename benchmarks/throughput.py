"""Batch throughput of CMAV certificates: certificates per second for a batch of prompts (issue 3).

One compiled bound function serves every prompt: the prompts are drawn from
templates x nouns and only those of one token length (the most common one)
are kept, so they share the graph (all-ones attention mask; a BERT encoder
reads its ids only through the word embeddings, which are the input set's
centre). ``jax.vmap`` of :meth:`BoundFunction.unchecked` runs ``--batch``
prompts per call, each an l_inf ball of radius ``--eps`` on its last word;
batches are looped (the last one filled by repeating a prompt). ``--check N``
recomputes the first N prompts one by one with :func:`diverify.cmav.certify`
(their own graph) and reports the largest difference of the cosine bounds.

Why not pad prompts of different lengths to one: the engine bakes plain
arguments (the attention mask) into the graph as constants, and passing the
mask's additive bias as a zero-width input set instead fails, as does any
masked key even with a constant mask: the pairwise softmax form evaluates
``exp(x_j - x_i)`` with ``x_i`` a masked score (~ -1e9), far outside exp's
float32 domain, so every padded prompt is "cannot bound 'exp'".

    python benchmarks/throughput.py --layers 1 --method crown-zonotope --eps 1e-5 --prompts 256
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bound_tightness import device_peak_gib
from diverify import cmav
from diverify.bounds import compile_bounds
from diverify.models import load_text_encoder
from diverify.specs import LpBall

TEMPLATES = ["a photo of a {}", "a painting of a {}", "a drawing of a {} in the snow", "a close-up photo of the {}",
             "a {} sitting on a table", "a black and white photo of a {}", "a watercolor of a small {}",
             "a {} in the park", "a cartoon of a happy {}", "an old photo of a {} on the beach",
             "a sculpture of a {}", "a blurry photo of the {}", "a {} at night", "a picture of my {}",
             "a toy {} on the floor", "a bright photo of a large {}"]
NOUNS = ["cat", "dog", "horse", "car", "house", "tree", "bird", "boat", "flower", "chair", "woman", "man",
         "castle", "bicycle", "apple", "mountain", "lion", "tiger", "bear", "cow", "sheep", "pig", "fish", "frog",
         "duck", "rabbit", "mouse", "snake", "train", "bus", "truck", "plane", "ship", "bridge", "church", "tower",
         "road", "river", "lake", "forest", "garden", "street", "city", "village", "table", "lamp", "clock", "book",
         "cup", "bottle", "shoe", "hat", "dress", "shirt", "girl", "boy", "child", "baby", "king", "queen",
         "soldier", "doctor", "teacher", "farmer"]  # single tokens: the 7-token prompts are 5 templates x 64 nouns
CONCEPTS = ["a gun", "a naked body"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--method", default="crown-zonotope")
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--threshold", type=float, default=0.9, help="certified = every concept's cosine bound < TAU")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="prompts per vmapped call")
    p.add_argument("--check", type=int, default=2, help="compare the first N prompts with their own certificate")
    p.add_argument("--out", default="benchmarks/out/throughput.json")
    return p.parse_args(argv)


def template_prompts() -> list[str]:
    """Every template x noun prompt, in order."""
    return [t.format(w) for t, w in itertools.product(TEMPLATES, NOUNS)]


def same_length_prompts(encoder, n: int) -> tuple[list[str], int]:
    """The first ``n`` template x noun prompts whose token length is the most common one."""
    texts = template_prompts()
    _, mask = encoder.tokenize(texts)
    lengths = mask.sum(1)
    common = int(np.bincount(lengths).argmax())
    return [t for t, n_tok in zip(texts, lengths) if n_tok == common][:n], common


def main(argv=None):
    args = parse_args(argv)
    enc = load_text_encoder(args.model)
    if args.layers is not None:
        enc = enc.with_layers(args.layers)
    texts, length = same_length_prompts(enc, args.prompts)
    n = len(texts)
    targets = cmav.concept_embeddings(enc, CONCEPTS)
    prompts = [cmav.make_prompt(enc, t) for t in texts]
    position = length - 2  # the last word, before [SEP]
    centers = jnp.concatenate([enc.word_embeddings(jnp.asarray(p.ids))[None] for p in prompts])  # [N, 1, L, H]
    fn = cmav.cosine_function(enc, prompts[0], targets)  # the same graph for every prompt of this length
    eps = jnp.float32(args.eps)
    t0 = time.perf_counter()
    ball = cmav.embedding_ball(enc, prompts[0], [position], args.eps)
    bf = compile_bounds(fn, ball, method=args.method)

    def one(center):
        res = bf.unchecked(LpBall(center, eps, ball.mask, ball.p, ball.support))
        return res.output.upper, res.output.lower, res.domain_ok

    run = jax.jit(jax.vmap(one))
    size = min(args.batch, n)
    compiled = run.lower(centers[:size]).compile()
    compile_seconds = time.perf_counter() - t0
    print(f"{n} prompts of {length} tokens; trace + compile {compile_seconds:.1f} s", flush=True)
    uppers, lowers, oks = [], [], []
    t1 = time.perf_counter()
    for start in range(0, n, size):
        idx = np.minimum(np.arange(start, start + size), n - 1)
        up, lo, ok = jax.block_until_ready(compiled(centers[idx]))
        keep = min(size, n - start)
        uppers.append(np.asarray(up)[:keep]), lowers.append(np.asarray(lo)[:keep]), oks.append(np.asarray(ok)[:keep])
        done = start + keep
        print(f"  {done}/{n} certificates, {done / (time.perf_counter() - t1):.3f}/s", flush=True)
    seconds = time.perf_counter() - t1
    upper, lower, ok = np.concatenate(uppers), np.concatenate(lowers), np.concatenate(oks)
    if not np.all(ok) or not np.all(np.isfinite(upper)):
        raise SystemExit(f"{int(np.sum(~ok))} bounds left their domain or are not finite: no certificate for them")
    clean = np.asarray(jax.jit(jax.vmap(fn))(centers))
    violation = float(np.max(np.maximum(clean - upper, lower - clean)))
    if violation > 1e-5:
        raise SystemExit(f"a bound misses the clean cosine by {violation:.3g} "
                         f"({int(np.sum(np.maximum(clean - upper, lower - clean) > 1e-5))} of {clean.size}): unsound")
    certified = np.all(upper < args.threshold, axis=1)
    checks = []
    for i in range(min(args.check, n)):
        single = cmav.certify(enc, prompts[i], cmav.embedding_ball(enc, prompts[i], [position], args.eps), CONCEPTS,
                              args.threshold, method=args.method, attack=False)
        own = np.asarray([v.cosine_upper for v in single.concepts])
        checks.append({"prompt": texts[i], "own_graph_upper": own.tolist(), "batched_upper": upper[i].tolist(),
                       "max_abs_difference": float(np.max(np.abs(own - upper[i])))})
        print(f"  check '{texts[i]}': batched upper {upper[i]}, own graph {own}", flush=True)
    result = {"device": jax.devices()[0].platform, "model": enc.name, "method": args.method, "eps": args.eps,
              "prompts": n, "prompts_asked": args.prompts, "tokens": int(length), "batch": size, "compile_seconds": compile_seconds,
              "seconds": seconds, "certificates_per_second": n / seconds, "certified": int(certified.sum()),
              "threshold": args.threshold, "violation": violation, "mean_upper_minus_clean": float(np.mean(upper - clean)),
              "checks": checks, "device_peak_gib": device_peak_gib()}
    print(f"| {result['device']} | {enc.name} | {args.method} | {n} | {length} | {size} | {compile_seconds:.1f} | "
          f"{seconds:.1f} | {n / seconds:.3f} | {int(certified.sum())}/{n} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
