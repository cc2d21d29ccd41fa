"""Pack all-MiniLM-L6-v2 for a lent GPU machine, whose working tree may not exceed 64 MiB.

The checkpoint is 87 MiB. The copy written here keeps every tensor except the rows of the
word-embedding matrix that no benchmark prompt uses (set to zero), then gzips the
safetensors file: about 39 MiB. On the benchmarks' prompts the copy is the same model
(``--check`` compares the pooled embeddings of all of them with the original: they must be
equal bit for bit). Unpack there with ``gunzip -k DIR/model.safetensors.gz`` and pass
``--model DIR`` / ``--model-dir DIR`` to the benchmarks.

    python benchmarks/pack_minilm.py --out .dev/minilm --check
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

import bound_tightness
import radius
import throughput
from diverify.models import load_text_encoder
from diverify.models.encoder import resolve_model


def benchmark_texts() -> list[str]:
    """Every prompt and concept of the MiniLM benchmarks."""
    texts = throughput.template_prompts() + throughput.CONCEPTS + list(radius.PAIRS) + [c for cs in radius.PAIRS.values() for c in cs]
    return texts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(".dev/minilm"))
    p.add_argument("--check", action="store_true", help="compare every benchmark prompt's embedding with the original")
    args = p.parse_args(argv)
    _, source = resolve_model("minilm")
    enc = load_text_encoder("minilm")
    texts = benchmark_texts()
    ids, mask = enc.tokenize(texts)
    used = set(np.asarray(ids)[np.asarray(mask) > 0].tolist()) | set(bound_tightness.PROBLEMS["minilm"][0])
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.copytree(source, args.out, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(str(source / "model.safetensors"))
    (key,) = [k for k in tensors if k.endswith("word_embeddings.weight")]
    keep = np.zeros(tensors[key].shape[0], bool)
    keep[sorted(used)] = True
    tensors[key] = np.where(keep[:, None], tensors[key], 0).astype(tensors[key].dtype)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "model.safetensors"
        save_file(tensors, str(plain), metadata={"format": "pt"})
        if args.check:
            shutil.copy(plain, args.out / "model.safetensors")
            same = np.array_equal(np.asarray(enc.embed(texts)), np.asarray(load_text_encoder(args.out).embed(texts)))
            (args.out / "model.safetensors").unlink()
            if not same:
                raise SystemExit("the packed copy embeds a benchmark prompt differently: a used token was dropped")
            print(f"checked: {len(texts)} benchmark texts embed identically")
        with open(plain, "rb") as f, gzip.open(args.out / "model.safetensors.gz", "wb", compresslevel=6) as out:
            shutil.copyfileobj(f, out)
    size = (args.out / "model.safetensors.gz").stat().st_size / 2 ** 20
    print(f"{args.out}: {int(keep.sum())} of {keep.size} word-embedding rows kept, {size:.1f} MiB gzipped")


if __name__ == "__main__":
    main()
