"""Forward time of all-MiniLM-L6-v2: the Flax port (jit, warm) against the PyTorch reference.

Both compute the full sentence-transformers pipeline (BERT, mean pooling, L2
normalisation) on random token ids of a fixed length with no padding. JAX runs
on its default device (a GPU when jax has one); PyTorch on CUDA when it can,
else on the CPU; the table and the JSON say which. Times are wall-clock medians
over ``--repeats`` calls after one warm-up call (which includes compilation).
Nothing here asserts a timing.

    python benchmarks/embed_speed.py --batches 1 256 --seq-len 16 --out benchmarks/out/embed_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="model name or checkpoint directory (default: minilm)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256], help="batch sizes (default: 1 256)")
    parser.add_argument("--seq-len", type=int, default=16, help="tokens per sequence (default: 16)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (default: 10)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--out", default="benchmarks/out/embed_speed.json", help="where to write the JSON results")
    return parser.parse_args(argv)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: compilation (JAX) and allocator warm-up (PyTorch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def torch_reference(directory: str):
    """(device name, fn(ids) -> np.ndarray) computing BertModel + mean pooling + normalisation in PyTorch."""
    import torch
    from transformers import BertModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = BertModel.from_pretrained(directory, add_pooling_layer=False, dtype=torch.float32).eval().to(device)

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            t = torch.as_tensor(ids, dtype=torch.long, device=device)
            mask = torch.ones_like(t)
            hidden = model(input_ids=t, attention_mask=mask).last_hidden_state
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
            out = torch.nn.functional.normalize(pooled, dim=-1)
            if device == "cuda":
                torch.cuda.synchronize()
            return out.cpu().numpy()

    name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return f"torch {torch.__version__} {name}", run


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from diverify.models import load_text_encoder

    encoder = load_text_encoder(args.model)
    jax_device = jax.devices()[0]
    devices = {"flax": f"jax {jax.__version__} {jax_device.platform} {jax_device.device_kind}"}
    reference = None
    if not args.no_torch:
        devices["torch"], reference = torch_reference(encoder.directory)

    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batches:
        ids = rng.integers(1000, encoder.config.vocab_size, size=(batch, args.seq_len)).astype(np.int32)
        flax_out = np.asarray(encoder.embed_ids(ids))
        impls = {"flax": lambda: encoder.embed_ids(ids).block_until_ready()}
        max_abs_diff = None
        if reference is not None:
            impls["torch"] = lambda: reference(ids)
            max_abs_diff = float(np.abs(flax_out - reference(ids)).max())
        for impl, fn in impls.items():
            ms = median_ms(fn, args.repeats)
            rows.append({"impl": impl, "device": devices[impl], "batch": batch, "seq_len": args.seq_len,
                         "median_ms": ms, "sentences_per_s": batch / (ms / 1e3),
                         "max_abs_diff_vs_torch": max_abs_diff})

    print(f"embed speed: {encoder.name}, sequence length {args.seq_len}, median of {args.repeats} warm calls")
    for impl, device in devices.items():
        print(f"  {impl}: {device}")
    print(f"{'impl':<6} {'batch':>6} {'median ms':>11} {'sentences/s':>13} {'max |flax - torch|':>19}")
    for row in rows:
        diff = "-" if row["max_abs_diff_vs_torch"] is None else f"{row['max_abs_diff_vs_torch']:.2e}"
        print(f"{row['impl']:<6} {row['batch']:>6} {row['median_ms']:>11.2f} {row['sentences_per_s']:>13.1f} {diff:>19}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "embed_speed", "model": encoder.name, "devices": devices,
                               "host": platform.node(), "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
