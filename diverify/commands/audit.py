"""``diverify audit``: parameter-level audit of a suspect checkpoint's weight deltas against its base."""

from __future__ import annotations

import argparse

HELP = "audit a suspect checkpoint or LoRA adapter's weight deltas against the base (PLA)"

DESCRIPTION = """\
Parameter-level audit: for every weight matrix, dW = W_suspect - W_base (or the
scaled B @ A of a PEFT LoRA adapter) is measured: ||dW||_F and relative norm,
top singular values, stable and effective rank, the share of dW's energy
outside W's principal subspace, and, when the base loads as a text encoder,
how much dW changes the layer's output per unit of clean-input energy (the
probe prompts' inputs to that layer), relative to isotropic inputs, along the
directions of dW's top singular vectors. A ROME-style edit is one direction
clean inputs avoid, standing apart from the rest of the delta; benign
fine-tunes act where clean inputs live, merged LoRAs along random directions. The score is an empirical detection
statistic (higher = more suspicious), not a bound. With --policy the command
is a handover gate: exit 1 when a rule of the TOML policy fails.
"""

EPILOG = """\
examples:
  diverify audit --base minilm --suspect ./released-checkpoint
  diverify audit --base minilm --suspect ./lora-adapter --json
  diverify audit --base ./base --suspect ./tuned --policy policy.toml --plot audit.png
policy.toml:
  max_score = 0.62
  max_relative_norm = 0.05
  [kinds."encoder.layer.*.attention.self.key.weight"]
  max_relative_norm = 0.01
exit codes: 0 passed, 1 a policy rule failed, 2 bad input
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("audit", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, metavar="DIR|minilm", help="the trusted base checkpoint")
    parser.add_argument("--suspect", required=True, metavar="DIR|ADAPTER_DIR",
                        help="the checkpoint to audit, or a PEFT LoRA adapter directory for the base")
    parser.add_argument("--probe", action="append", metavar="PROMPT",
                        help="a clean probe prompt (repeatable; default: 32 built-in everyday sentences)")
    parser.add_argument("--no-probes", action="store_true",
                        help="data-free audit only (no text encoder is loaded)")
    parser.add_argument("--jacobian", action="store_true",
                        help="also measure each matrix's Jacobian sensitivity on the probes (slower)")
    parser.add_argument("--policy", metavar="FILE.toml", help="thresholds; exit 1 when one fails")
    parser.add_argument("--top-k", type=int, default=8, metavar="K",
                        help="singular values reported per matrix (default 8)")
    parser.add_argument("--rows", type=int, default=10, metavar="N",
                        help="matrices shown in the table, most suspicious first (default 10)")
    parser.add_argument("--plot", metavar="FILE.png", help="write a figure of the per-matrix suspicion")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (score, flagged, matrices, hashes, policy) and nothing else")
    parser.set_defaults(func=handler)


def plot_report(report, path: str) -> None:
    """Per-matrix suspicion in checkpoint order, flagged matrices in red (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diverify.errors import DiverifyError

    rows = sorted(report.matrices, key=lambda a: a.name)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(rows)), 4.0))
    ax.bar(range(len(rows)), [a.suspicion for a in rows],
           color=["tab:red" if a.flagged else "tab:blue" for a in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([a.name.removesuffix(".weight") for a in rows], rotation=90, fontsize=6)
    ax.set_ylabel("suspicion" + (" (log10 row-space gain + gap)" if report.mode == "data-aware" else " (robust z)"))
    ax.set_title(f"diverify audit: score {report.score:.3g}, {len(report.flagged)} flagged ({report.mode})")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as err:
        raise DiverifyError(f"--plot {path}: cannot write ({err.strerror})") from err
    finally:
        plt.close(fig)


def handler(args: argparse.Namespace) -> int:
    from diverify.audit.report import audit_models, load_policy, policy_violations
    from diverify.errors import DiverifyError
    from diverify.results import dumps, to_jsonable

    if args.top_k < 1:
        raise DiverifyError(f"--top-k must be at least 1, got {args.top_k}")
    if args.no_probes and (args.probe or args.jacobian):
        raise DiverifyError("--no-probes cannot be combined with --probe or --jacobian")
    policy = load_policy(args.policy) if args.policy else None
    report = audit_models(args.base, args.suspect, probes=args.probe, use_probes=not args.no_probes,
                          jacobian=args.jacobian, top_k=args.top_k)
    violations = policy_violations(report, policy) if policy is not None else []
    if args.plot:
        plot_report(report, args.plot)
    if args.json:
        out = to_jsonable(report)
        if policy is not None:
            out["policy"] = {"file": args.policy, "passed": not violations, "violations": violations}
        print(dumps(out))
    else:
        print(f"audit of {args.suspect} against {args.base} ({report.mode}"
              + (f", {report.n_probes} probes" if report.n_probes else "") + ")")
        print(f"score {report.score:.4g} (higher = more suspicious); flagged: "
              + (", ".join(report.flagged) if report.flagged else "none"))
        print(f"{'matrix':<48} {'suspicion':>9} {'rel.norm':>9} {'stab.rank':>9} {'null.E':>7} {'gain':>8}")
        for a in report.matrices[:max(args.rows, 0)]:
            gain = "-" if a.row_space_gain is None else f"{a.row_space_gain:.3g}"
            mark = " *" if a.flagged else ""
            print(f"{a.name:<48} {a.suspicion:>9.3g} {a.relative_norm:>9.3g} {a.stable_rank:>9.3g} "
                  f"{a.null_space_energy:>7.3f} {gain:>8}{mark}")
        print(f"base {report.base_hash}\nsuspect {report.suspect_hash}")
        if policy is not None:
            print("policy " + args.policy + (": passed" if not violations else ": FAILED"))
            for line in violations:
                print("  " + line)
    return 1 if violations else 0
