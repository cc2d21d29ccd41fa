"""``diverify embed``: text embeddings from the Flax port, as sentence-transformers' ``encode`` gives them."""

from __future__ import annotations

import argparse
import re

from diverify.errors import DiverifyError

HELP = "embed texts (or one sequence of token ids) with a text encoder"

DESCRIPTION = """\
Embed texts with the Flax port of a text encoder, exactly as sentence-transformers'
encode() would for that checkpoint: pooling and normalisation come from the
checkpoint's modules.json (a plain Hugging Face BERT is mean-pooled; a CLIP text
model gives its projected EOS embedding when it has text_projection, else the
pooled output). Nothing is downloaded.
"""

EPILOG = """\
examples:
  diverify embed "a photo of a cat"
  diverify embed --json "a photo of a cat" "a photo of a dog"
  diverify embed --model ./my-bert-checkpoint --ids 101,1037,6302,102
"""

#: Coordinates shown per embedding in the table.
SHOWN_COORDINATES = 4
TEXT_WIDTH = 40


def register(subparsers) -> None:
    parser = subparsers.add_parser("embed", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (one embedding each)")
    parser.add_argument("--model", default="minilm", metavar="NAME|DIR",
                        help="'minilm' (all-MiniLM-L6-v2, the default) or a Hugging Face checkpoint directory")
    parser.add_argument("--ids", metavar="ID,ID,...",
                        help="embed this one sequence of token ids instead of TEXT (bypasses the tokenizer)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object {"model": ..., "embeddings": [[...], ...]} and nothing else')
    parser.set_defaults(func=handler)


def parse_ids(text: str) -> list[int]:
    """``"101, 1037,102"`` -> ``[101, 1037, 102]``; DiverifyError naming a non-integer item."""
    items = [item for item in re.split(r"[,\s]+", text.strip()) if item]
    if not items:
        raise DiverifyError("--ids: no token ids given")
    ids = []
    for item in items:
        try:
            ids.append(int(item))
        except ValueError:
            raise DiverifyError(f"--ids: {item!r} is not an integer token id") from None
    return ids


def handler(args: argparse.Namespace) -> int:
    if args.ids is None and not args.texts:
        raise DiverifyError("nothing to embed: give TEXT arguments or --ids")
    if args.ids is not None and args.texts:
        raise DiverifyError("give either TEXT arguments or --ids, not both")

    import numpy as np

    from diverify.models import load_text_encoder
    from diverify.results import dumps

    encoder = load_text_encoder(args.model)
    if args.ids is not None:
        ids = parse_ids(args.ids)
        embeddings = np.asarray(encoder.embed_ids(np.asarray([ids])))
        labels = ["ids " + ",".join(map(str, ids))]
    else:
        embeddings = encoder.embed(args.texts)
        labels = list(args.texts)

    if args.json:
        print(dumps({"model": encoder.name, "embeddings": embeddings}))
        return 0
    print(f"model: {encoder.name}  ({encoder.arch}, pooling {encoder.pooling}"
          f"{', normalised' if encoder.normalize else ''})")
    print(f"{'text':<{TEXT_WIDTH}}  {'dim':>4}  {'norm':>8}  first coordinates")
    for label, row in zip(labels, embeddings):
        shown = label if len(label) <= TEXT_WIDTH else label[:TEXT_WIDTH - 3] + "..."
        head = " ".join(f"{v:+.4f}" for v in row[:SHOWN_COORDINATES])
        print(f"{shown:<{TEXT_WIDTH}}  {row.shape[0]:>4}  {float(np.linalg.norm(row)):>8.4f}  {head} ...")
    return 0
