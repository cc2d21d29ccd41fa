"""Backdoor detection end to end: every diverify check on backdoored fixtures and their clean twins.

For the text-encoder fixtures (``text``: Rickrolling fine-tune of MiniLM; ``edit``: rank-one ROME edit that
makes the model read the trigger word as the target word; see :func:`restricted_concept`)
and, with ``--denoiser``, the digits-denoiser fixtures (rows from
:func:`diverify.backdoors.denoiser.detection_rows`), for the backdoored model and its clean twin:

- **DIS**: per held-out prompt, the text DIS of ``trigger:T`` and of ``random`` (matched size: one inserted
  token), ``--samples`` perturbations each; AUROC of trigger vs random scores over the prompts;
- **certify** (``--certify``, CMAV, method ``exhaustive``): the first word of ``"<trigger> prompt"`` may be
  the trigger or any of ``--candidates`` random whole-word tokens (the same list for both models); the full
  model is evaluated at every choice against the target at cosine ``--certify-threshold``: certified (no
  token of the list reaches it) / collision (with the token). A hull bound (l_inf ball or the tokens'
  convex hull) is vacuous through six layers, so the discrete, exact certificate is the one reported;
- **ball** (``--ball-eps``, edit fixture only): the same question for an l_inf ball on the trigger's word
  embedding, bounded by the engine on the encoder truncated to ``--ball-layers`` layers;
- **CWS**: the smoothed-collision certificate for trigger -> target (``--sigma``, ``--cws-samples``);
- **audit**: the weight audit (:func:`diverify.audit.report.audit_models`) of the model against MiniLM (the
  denoisers: against the pre-trained base of their fixture).

Fixtures are built once and cached under ``--cache`` (``diverify backdoor build`` writes the same layout).
Prints a table, writes ``--out`` (JSON) and a figure beside it (PNG). Never asserts anything.

    python benchmarks/backdoor_detection.py --prompts 40 --samples 8 --out benchmarks/out/backdoor_detection.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diverify.backdoors import text  # noqa: E402
from diverify.backdoors.denoiser import auroc  # noqa: E402

BUILDERS = {"text": text.build_text_backdoor, "edit": text.build_edit_backdoor}


def fixture(kind: str, cache: Path, seed: int) -> dict:
    """The built fixture's summary, building it first when ``cache`` holds none."""
    out = cache / f"{kind}-seed{seed}"
    if not (out / "fixture.json").is_file():
        print(f"building the {kind} fixture in {out} (minutes) ...", file=sys.stderr)
        BUILDERS[kind](out, seed=seed)
    return json.loads((out / "fixture.json").read_text())


def dis_scores(encoder, prompts, trigger: str, samples: int, seed: int) -> tuple[list[float], list[float]]:
    from diverify.dis.text import text_dis

    trig = [text_dis(encoder, p, f"trigger:{trigger}", samples=samples, seed=seed + i).dis
            for i, p in enumerate(prompts)]
    rand = [text_dis(encoder, p, "random", samples=samples, seed=seed + i).dis for i, p in enumerate(prompts)]
    return trig, rand


def certify_row(encoder, prompt: str, trigger: str, target: str, threshold: float, candidates: int, seed: int) -> dict:
    """The exhaustive CMAV certificate on the whole model: the first word of ``"<w> prompt"`` may be
    the trigger or any of ``candidates`` whole-word tokens drawn with ``seed`` (the same list for every
    model); the answer is exact for that token list."""
    from diverify import cmav
    from diverify.dis.text import control_words

    p = cmav.make_prompt(encoder, f"{trigger} {prompt}")
    rng = np.random.default_rng(seed)
    pool = [w for w in control_words(encoder) if w != trigger]
    words = [str(w) for w in rng.choice(pool, size=candidates, replace=False)]
    ids = [int(encoder.tokenize([w])[0][0][1]) for w in words]
    s, table = cmav.substitution_set(encoder, p, {1: ids})
    cert = cmav.certify(encoder, p, s, [target], threshold, method="exhaustive", table_ids=table)
    v = cert.concepts[0]
    return {"status": v.status, "combinations": cert.perturbation["combinations"], "threshold": threshold,
            "highest_cosine": v.cosine_upper, "witness": v.witness, "reason": v.reason, "seconds": cert.seconds}


def ball_row(encoder, prompt: str, trigger: str, concept: str, eps: float, threshold: float, layers: int) -> dict:
    """The l_inf-ball CMAV certificate (crown-zonotope) around the trigger's word embedding, first word of
    ``"<trigger> prompt"``, on the encoder truncated to ``layers`` layers (a ball bound through all six is
    vacuous, issue 3; the edit fixture's backdoor lives in layer 0, so a truncation keeps it)."""
    from diverify import cmav

    short = encoder.with_layers(layers)
    p = cmav.make_prompt(short, f"{trigger} {prompt}")
    cert = cmav.certify(short, p, cmav.embedding_ball(short, p, [1], eps), [concept], threshold,
                        method="crown-zonotope")
    v = cert.concepts[0]
    return {"status": v.status, "eps": eps, "layers": layers, "threshold": threshold,
            "cosine_upper": v.cosine_upper, "reason": v.reason, "seconds": cert.seconds}


def cws_row(encoder, prompt: str, trigger: str, target: str, threshold: float, sigma: float, samples: int) -> dict:
    from diverify.cws import predicates, sampling
    from diverify.cws.certificate import certify_smoothed_predicate

    predicate = predicates.text_collision_predicate(encoder, prompt, trigger, target, threshold)
    triggered = predicates.insert_trigger(prompt, trigger, 0)
    perturbation = sampling.restrict_rows(sampling.weight_perturbation(encoder.params),
                                          predicates.rows_read_by_texts(encoder, [triggered]))
    cert = certify_smoothed_predicate(predicate, encoder.params, perturbation, sigma=sigma, num_samples=samples,
                                      alpha=1e-3, batch_size=8)
    return {"p_hat": cert.p_hat, "p_upper": cert.p_upper, "certified_edit_radius": cert.certified_edit_radius}


def audit_row(path: str, base: str = "minilm") -> dict:
    from diverify.audit.report import audit_models

    report = audit_models(base, path)
    return {"score": report.score, "flagged": list(report.flagged)[:3], "verdict":
            "FLAGGED" if report.flagged else "pass"}


def restricted_concept(kind: str, summary: dict, prompt: str, args) -> tuple[str, float, float]:
    """The concept the trigger must not reach, with the certificate's and the CWS predicate's thresholds.

    Rickrolling (``text``): the fixture's target prompt at ``--certify-threshold`` / ``--threshold``.
    Edit: the prompt read with the target word in the trigger's place (the edit substitutes a concept),
    at the fixture's own success cosine for both."""
    if kind == "edit":
        return f"{summary['target']} {prompt}", summary["success_cosine"], summary["success_cosine"]
    return summary["target"], args.certify_threshold, args.threshold


def text_rows(kind: str, args) -> list[dict]:
    from diverify.models import load_text_encoder

    summary = fixture(kind, args.cache, args.seed)
    _, heldout = text.split_prompts(args.seed)
    prompts = heldout[:args.prompts]
    rows = []
    for role in ("backdoored", "clean"):
        start = time.perf_counter()
        info = summary[role]
        encoder = load_text_encoder(info["path"])
        trig, rand = dis_scores(encoder, prompts, summary["trigger"], args.samples, args.seed)
        row = {"fixture": kind, "model": role, "clean_cosine": info["clean_cosine_mean"],
               "trigger_success": info["trigger_success"], "score": "DIS sqrt(2KL)/dist (per token)",
               "trigger_score": float(np.median(trig)), "random_score": float(np.median(rand)),
               "auroc": auroc(np.array(trig), np.array(rand)), "trigger_scores": trig, "random_scores": rand}
        concept, certify_threshold, cws_threshold = restricted_concept(kind, summary, prompts[0], args)
        if args.certify:
            row["certify"] = certify_row(encoder, prompts[0], summary["trigger"], concept, certify_threshold,
                                         args.candidates, args.seed)
        if args.ball_eps and kind == "edit":
            row["ball"] = ball_row(encoder, prompts[0], summary["trigger"], concept, args.ball_eps,
                                   args.ball_threshold, args.ball_layers)
        if args.cws_samples:
            row["cws"] = cws_row(encoder, prompts[0], summary["trigger"], concept, cws_threshold, args.sigma,
                                 args.cws_samples)
        if not args.no_audit:
            row["audit"] = audit_row(info["path"])
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"  {kind}/{role}: AUROC {row['auroc']:.3f} ({row['seconds']:.0f} s)", file=sys.stderr)
    return rows


def denoiser_rows(args) -> list[dict]:
    from diverify.backdoors.denoiser import build_denoiser_backdoor, detection_rows

    rows = []
    for trigger in ("xt", "cond"):
        out = args.cache / f"denoiser-{trigger}-seed{args.seed}"
        if not (out / "fixture.json").is_file():
            build_denoiser_backdoor(out, seed=args.seed, trigger=trigger)
        found = detection_rows(out, seed=args.seed)
        if not args.no_audit:  # against the pre-trained base both models were fine-tuned from
            for row in found:
                row["audit"] = audit_row(str(out / row["model"]), base=str(out / "base"))
        rows.extend(found)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'fixture':<14} {'model':<11} {'clean cos/acc':>13} {'trig. succ.':>11} {'DIS trig':>9} "
          f"{'DIS rand':>9} {'AUROC':>6} {'certify':>10} {'ball':>10} {'CWS p_up':>9} {'CWS R':>8} {'audit':>8}")
    for r in rows:
        clean = r.get("clean_cosine", r.get("clean_accuracy"))
        cert = r.get("certify", {}).get("status", "-")
        ball = r.get("ball", {}).get("status", "-")
        cws = r.get("cws", {})
        audit = r.get("audit", {}).get("verdict", "-")
        p_up = f"{cws['p_upper']:.3f}" if cws else "-"
        radius = f"{cws['certified_edit_radius']:.4f}" if cws else "-"
        print(f"{r['fixture']:<14} {r['model']:<11} {clean:>13.4f} {r['trigger_success']:>11.1%} "
              f"{r['trigger_score']:>9.4f} {r['random_score']:>9.4f} {r['auroc']:>6.3f} {cert:>10} {ball:>10} "
              f"{p_up:>9} {radius:>8} {audit:>8}")


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if "trigger_scores" in r]
    fig, axes = plt.subplots(1, len(scored), figsize=(3.2 * len(scored), 3.2), sharey=False, squeeze=False)
    for ax, r in zip(axes[0], scored):
        ax.hist(r["random_scores"], bins=15, alpha=0.6, label="random token")
        ax.hist(r["trigger_scores"], bins=15, alpha=0.6, label="trigger")
        ax.set_title(f"{r['fixture']} / {r['model']}\nAUROC {r['auroc']:.3f}", fontsize=9)
        ax.set_xlabel("DIS (embedding shift per token)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["text", "edit"], choices=list(BUILDERS))
    parser.add_argument("--denoiser", action="store_true", help="add the denoiser rows (7b's detection_rows)")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/out/fixtures"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=40, help="held-out prompts for the AUROC")
    parser.add_argument("--samples", type=int, default=8, help="perturbations per prompt and DIS")
    parser.add_argument("--certify", action="store_true",
                        help="run the exhaustive CMAV certificate over the trigger and --candidates other first words")
    parser.add_argument("--candidates", type=int, default=63, help="other first words in the certificate's token list")
    parser.add_argument("--certify-threshold", type=float, default=0.8, dest="certify_threshold",
                        help="text fixture: collision threshold of the certificate (its trigger-success cosine)")
    parser.add_argument("--ball-eps", type=float, default=0.0, dest="ball_eps",
                        help="edit fixture: also certify an l_inf ball of this radius on the trigger's embedding")
    parser.add_argument("--ball-threshold", type=float, default=0.98, dest="ball_threshold")
    parser.add_argument("--ball-layers", type=int, default=1, dest="ball_layers",
                        help="layers of the truncated encoder the ball certificate bounds")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="text fixture: the CWS predicate's cosine (edit: the fixture's success cosine)")
    parser.add_argument("--cws-samples", type=int, default=0, dest="cws_samples")
    parser.add_argument("--sigma", type=float, default=1e-3)
    parser.add_argument("--no-audit", action="store_true", dest="no_audit")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/backdoor_detection.json"))
    args = parser.parse_args(argv)
    rows = [row for kind in args.kinds for row in text_rows(kind, args)]
    if args.denoiser:
        rows.extend(denoiser_rows(args))
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    figure(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
