"""``diverify dna``: a model's provenance fingerprint, and lineage verification against a stored one."""

from __future__ import annotations

import argparse

HELP = "fingerprint a checkpoint (content hash, architecture, spectral signature) or verify its lineage"

DESCRIPTION = """\
Model DNA. Without --verify: print the fingerprint of MODEL: a sha256 content
hash over its tensors in canonical order (names, dtypes, shapes, bytes), an
architecture summary, and a compact per-matrix signature (top singular values
and a seeded sketch). With --verify MODEL --against FP.json: compare MODEL
with a stored fingerprint: identical (same bytes), lineage (same structure,
signatures within LINEAGE_DISTANCE, e.g. a fine-tune; the distance is
printed) or unrelated.
"""

EPILOG = """\
examples:
  diverify dna minilm
  diverify dna ./checkpoint --json > fp.json
  diverify dna --verify ./released --against fp.json
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("dna", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", metavar="MODEL", help="checkpoint directory, .safetensors file or 'minilm'")
    parser.add_argument("--verify", metavar="MODEL", help="the model to verify against --against")
    parser.add_argument("--against", metavar="FP.json", help="a fingerprint written by `diverify dna --json`")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from diverify import dna
    from diverify.errors import DiverifyError
    from diverify.results import dumps

    if args.verify is not None or args.against is not None:
        if args.verify is None or args.against is None or args.model is not None:
            raise DiverifyError("verification needs exactly --verify MODEL --against FP.json")
        stored = dna.load_fingerprint(args.against)
        result = dna.compare(stored, dna.fingerprint(args.verify))
        if args.json:
            print(dumps(result))
        else:
            print(f"{args.verify} vs {args.against}: {result.verdict} "
                  f"(distance {result.distance:.4g}, spectral distance {result.spectral_distance:.4g}, "
                  f"lineage below {dna.LINEAGE_DISTANCE})")
        return 0
    if args.model is None:
        raise DiverifyError("give MODEL, or --verify MODEL --against FP.json")
    fp = dna.fingerprint(args.model)
    if args.json:
        print(dumps(fp))
    else:
        print(f"model {args.model}")
        print(f"content hash   {fp.content_hash}")
        print(f"structure hash {fp.structure_hash}")
        print(f"tensors {fp.n_tensors}, parameters {fp.n_parameters:,}")
        for key, value in fp.architecture.items():
            print(f"  {key}: {value}")
        print(f"signature: {len(fp.signatures)} matrices x top-{fp.signature_rank} singular values")
        for name in list(fp.signatures)[:5]:
            values = ", ".join(f"{v:.3g}" for v in fp.signatures[name].singular_values[:4])
            print(f"  {name}: {values}, ...")
    return 0
