"""The audit's verdict: per-matrix metrics, a suspicion score, flagged matrices, and a TOML policy gate.

Per matrix, ``suspicion`` is (all scores: higher = more suspicious)

- data-aware (the matrix's input second moment C is known from probe prompts):
  from the clean-input gains ``g_1 >= g_2`` of dW inside the span of its top
  :data:`~diverify.audit.probe.ROW_SPACE_DIRECTIONS` right singular vectors
  (:func:`diverify.audit.probe.row_space_gains`: the largest change of the
  layer's output per unit of clean-input energy, relative to isotropic inputs
  and to ``||dW||_2``),

      suspicion = log10(g_1) + GAP_WEIGHT * min(log10(g_1 / g_2), GAP_CAP)

  (``g_2 = 0``, i.e. the gap at its cap, for a rank-one delta). The first term
  says that dW has a direction clean inputs barely excite, as a ROME edit's
  ``C^{-1} k*`` is by construction; benign fine-tunes move W by sums of
  ``grad_y x^T`` over clean inputs (``g << 1``). The second says that this one
  direction stands apart from the rest of the delta: a merged LoRA's random
  factor directions all sit near ``g = 1`` together (no gap), while an edit
  hidden in a fine-tune is one off-data direction among on-data ones.
  Flagged above :data:`FLAG_SUSPICION`. ``GAP_WEIGHT``, ``GAP_CAP`` and the
  subspace size were chosen on calibration seeds of benchmarks/audit.py and
  reported on held-out seeds (benchmarks/RESULTS.md).
  (``top_direction_input_gain`` and ``input_energy_ratio`` are reported too.)
  A rank-one delta always gets the full gap, so any single-direction change of
  a matrix off the clean inputs' main directions is flagged: a lone ROME edit,
  but also a merged rank-1 LoRA (random direction, ``g_1`` about 1, suspicion
  about 1.0); audit rank-1 adapters with a policy ``max_score`` above that.
- data-free (no C): the robust z-score of ``-log(stable_rank)`` against the
  other matrices of the same kind (``encoder.layer.*.attention.self.key.weight``),
  flagged above :data:`FLAG_ANOMALY` = 3.5 (Iglewicz and Hoaglin's outlier rule).
  This only sees an edit that stands out in spectral concentration and is weak
  against an edit hidden in a fine-tune.

Matrices with an exactly zero delta have suspicion 0, and so do, in a
data-aware audit, matrices the probes do not reach (embedding tables, a pooler
the pipeline does not use; their data-free ``anomaly`` is still reported). The
overall ``score`` is the largest suspicion among changed matrices that have one
(0 when nothing changed). These are empirical detection statistics, not bounds.

Policy file (TOML; every key optional)::

    max_score = 0.62             # on the overall score
    max_flagged = 0              # number of flagged matrices
    max_relative_norm = 0.05     # per matrix, ||dW||_F / ||W||_F
    max_null_space_energy = 1.0  # per matrix
    max_suspicion = 0.62         # per matrix
    [kinds."encoder.layer.*.attention.self.key.weight"]   # per-kind overrides
    max_relative_norm = 0.01
    [matrices."encoder.layer.5.output.dense.weight"]      # per-matrix overrides
    max_relative_norm = 0.0
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diverify.audit.probe import (ProbeStatistics, direction_input_gain, input_energy_ratio, probe_statistics,
                                  row_space_gains)
from diverify.audit.spectral import LowRankDelta, TruncatedSVD, per_kind_z_scores, spectral_metrics
from diverify.audit.weights import MatrixPair
from diverify.errors import DiverifyError

#: Weight of the gap ``log10(g_1 / g_2)`` in the data-aware suspicion, and its cap in decades.
GAP_WEIGHT = 0.5
GAP_CAP = 2.0
#: Data-aware flag threshold on the suspicion. Calibrated on benign deltas only, on
#: the calibration seeds 0 and 1 of benchmarks/audit.py (MiniLM, 32 default probes,
#: 132 benign fine-tunes / merged LoRAs): their largest suspicion is 0.620 (a
#: merged LoRA r4). On the held-out seeds 7 and 13 it gives FPR 0 / 132 (largest
#: benign 0.453) and TPR 0.93 on planted edits matched in norm to the fine-tune
#: (key 1.00, value 0.88, FFN output 0.97). A different model, probe set or kind
#: of fine-tune needs its own calibration on benign deltas (a policy's max_score).
FLAG_SUSPICION = 0.62
#: Data-free flag threshold on the per-kind robust z-score.
FLAG_ANOMALY = 3.5


@dataclasses.dataclass(frozen=True)
class MatrixAudit:
    """All metrics of one matrix delta; ``None`` where a data-aware metric had no probe data."""

    name: str
    kind: str
    shape: tuple[int, int]
    frobenius: float
    relative_norm: float
    top_singular_values: tuple[float, ...]
    stable_rank: float
    effective_rank: float
    null_space_energy: float
    anomaly: float
    input_energy_ratio: float | None
    top_direction_input_gain: float | None
    row_space_gain: float | None
    second_gain: float | None
    jacobian_base: float | None
    jacobian_suspect: float | None
    suspicion: float
    flagged: bool


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """The verdict. ``matrices`` are sorted most suspicious first."""

    score: float
    flagged: tuple[str, ...]
    mode: str
    matrices: tuple[MatrixAudit, ...]
    base_hash: str | None = None
    suspect_hash: str | None = None
    n_probes: int = 0


def data_aware_suspicion(gains: np.ndarray) -> float:
    """``log10(g_1) + GAP_WEIGHT * min(log10(g_1 / g_2), GAP_CAP)`` from :func:`row_space_gains` (``g_2 = 0`` if absent)."""
    top = max(float(gains[0]), 1e-12) if len(gains) else 1e-12
    second = float(gains[1]) if len(gains) > 1 else 0.0
    gap = GAP_CAP if second <= top * 10.0 ** -GAP_CAP else math.log10(top / second)
    return math.log10(top) + GAP_WEIGHT * gap


def audit_pairs(pairs: Iterable[MatrixPair], probes: Mapping[str, ProbeStatistics] | None = None,
                jacobians: Mapping[str, tuple[float, float]] | None = None, top_k: int = 8,
                subspace_rank: int = 16, base_svds: Mapping[str, TruncatedSVD] | None = None,
                n_probes: int = 0) -> AuditReport:
    """Audit every (base, delta) pair; ``probes`` (name -> :func:`probe_statistics`) switches on the data-aware score.

    ``base_svds`` optionally supplies W's top singular subspaces (to reuse them
    across many audits of the same base); ``jacobians`` the per-matrix
    sensitivities of :func:`diverify.audit.probe.jacobian_sensitivities`.
    """
    probes = probes or {}
    jacobians = jacobians or {}
    rows = []
    for pair in pairs:
        metrics, d_svd = spectral_metrics(pair.name, pair.base, pair.delta, top_k=top_k,
                                          subspace_rank=subspace_rank,
                                          base_svd=None if base_svds is None else base_svds.get(pair.name))
        ratio = gain = gains = None
        stats = probes.get(pair.name)
        if stats is not None and metrics.frobenius > 0 and stats.moment.shape[0] == pair.base.shape[1]:
            ratio = input_energy_ratio(pair.delta, stats.moment)
            gain = direction_input_gain(d_svd.vt[0], stats.moment)
            gains = row_space_gains(d_svd.s, d_svd.vt, stats)
        rows.append((metrics, ratio, gain, gains))
    if not rows:
        raise DiverifyError("nothing to audit: no weight matrices in common")
    concentration = np.array([-math.log(row[0].stable_rank) if row[0].stable_rank > 0 else 0.0 for row in rows])
    anomalies = per_kind_z_scores([row[0].kind for row in rows], concentration)
    data_aware = any(row[2] is not None for row in rows)
    audits = []
    for (m, ratio, gain, gains), anomaly in zip(rows, anomalies):
        if m.frobenius == 0.0:
            suspicion, flagged = 0.0, False
        elif data_aware:
            suspicion = data_aware_suspicion(gains) if gains is not None else 0.0
            flagged = suspicion > FLAG_SUSPICION
        else:
            suspicion, flagged = float(anomaly), bool(anomaly > FLAG_ANOMALY)
        jac = jacobians.get(m.name, (None, None))
        audits.append(MatrixAudit(
            name=m.name, kind=m.kind, shape=m.shape, frobenius=m.frobenius, relative_norm=m.relative_norm,
            top_singular_values=m.top_singular_values, stable_rank=m.stable_rank,
            effective_rank=m.effective_rank, null_space_energy=m.null_space_energy,
            anomaly=float(anomaly), input_energy_ratio=ratio, top_direction_input_gain=gain,
            row_space_gain=None if gains is None else float(gains[0]),
            second_gain=None if gains is None else (float(gains[1]) if len(gains) > 1 else 0.0),
            jacobian_base=jac[0], jacobian_suspect=jac[1], suspicion=float(suspicion), flagged=flagged))
    audits.sort(key=lambda a: (-a.suspicion, a.name))
    scored = [a.suspicion for a in audits
              if a.frobenius > 0 and (not data_aware or a.top_direction_input_gain is not None)]
    return AuditReport(
        score=max(scored) if scored else 0.0,
        flagged=tuple(a.name for a in audits if a.flagged),
        mode="data-aware" if data_aware else "data-free",
        matrices=tuple(audits),
        n_probes=n_probes,
    )


#: Per-matrix policy rules: key -> the MatrixAudit field it caps.
MATRIX_RULES = {"max_relative_norm": "relative_norm", "max_null_space_energy": "null_space_energy",
                "max_suspicion": "suspicion", "max_frobenius": "frobenius"}
#: Whole-model policy rules.
MODEL_RULES = ("max_score", "max_flagged")


@dataclasses.dataclass(frozen=True)
class Policy:
    """Thresholds read from a TOML policy file (see the module docstring)."""

    model: Mapping[str, float]
    matrix: Mapping[str, float]
    kinds: Mapping[str, Mapping[str, float]]
    matrices: Mapping[str, Mapping[str, float]]


def _numbers(table: Mapping[str, Any], allowed: Iterable[str], where: str) -> dict[str, float]:
    out = {}
    allowed = tuple(allowed)
    for key, value in table.items():
        if key not in allowed:
            raise DiverifyError(f"{where}: unknown rule {key!r} (known: {', '.join(allowed)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DiverifyError(f"{where}: rule {key} must be a number, got {value!r}")
        out[key] = float(value)
    return out


def load_policy(path: str | Path) -> Policy:
    """Parse a policy TOML file; unknown rules and non-numbers raise DiverifyError naming the file."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise DiverifyError(f"policy {path}: cannot read ({err.strerror})") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DiverifyError(f"policy {path}: not valid TOML ({err})") from err
    kinds = data.pop("kinds", {})
    matrices = data.pop("matrices", {})
    top_model = {k: v for k, v in data.items() if k in MODEL_RULES}
    top_matrix = {k: v for k, v in data.items() if k not in MODEL_RULES}
    for what, table in (("kinds", kinds), ("matrices", matrices)):
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise DiverifyError(f"policy {path}: [{what}] must hold tables of rules")
    return Policy(
        model=_numbers(top_model, MODEL_RULES, f"policy {path}"),
        matrix=_numbers(top_matrix, MATRIX_RULES, f"policy {path}"),
        kinds={k: _numbers(v, MATRIX_RULES, f"policy {path} [kinds.{k!r}]") for k, v in kinds.items()},
        matrices={k: _numbers(v, MATRIX_RULES, f"policy {path} [matrices.{k!r}]") for k, v in matrices.items()},
    )


def policy_violations(report: AuditReport, policy: Policy) -> list[str]:
    """One line per failed rule (empty when the report passes the policy)."""
    failures = []
    if "max_score" in policy.model and report.score > policy.model["max_score"]:
        failures.append(f"max_score = {policy.model['max_score']:g} failed: score {report.score:.4g}")
    if "max_flagged" in policy.model and len(report.flagged) > policy.model["max_flagged"]:
        failures.append(f"max_flagged = {policy.model['max_flagged']:g} failed: "
                        f"{len(report.flagged)} flagged ({', '.join(report.flagged[:3])})")
    for audit in report.matrices:
        rules = {**policy.matrix, **policy.kinds.get(audit.kind, {}), **policy.matrices.get(audit.name, {})}
        for rule, limit in rules.items():
            value = getattr(audit, MATRIX_RULES[rule])
            if value > limit:
                failures.append(f"{rule} = {limit:g} failed for {audit.name}: {value:.4g}")
    return failures


def audit_models(base: str, suspect: str, probes: Iterable[str] | None = None, use_probes: bool = True,
                 jacobian: bool = False, top_k: int = 8, subspace_rank: int = 16) -> AuditReport:
    """Audit a suspect checkpoint or PEFT LoRA adapter directory against its base checkpoint.

    The data-aware score needs the base to load as a text encoder with a
    tokenizer (:func:`diverify.models.load_text_encoder`); otherwise, or with
    ``use_probes=False``, the audit is data-free. Explicit ``probes`` or
    ``jacobian=True`` on a model that does not load as a text encoder raise.
    Both content hashes (see :mod:`diverify.dna`) are embedded in the report.
    """
    from diverify.audit.probe import DEFAULT_PROBES, input_second_moments, jacobian_sensitivities
    from diverify.audit.weights import is_lora_adapter, iter_matrix_pairs, open_lora_adapter
    from diverify.safetensors_io import open_checkpoint
    from diverify.dna import content_hash, resolve_model_dir

    base_dir = resolve_model_dir(base)
    base_ckpt = open_checkpoint(base_dir)
    if is_lora_adapter(suspect):
        suspect_model = open_lora_adapter(suspect)
        suspect_hash = content_hash(open_checkpoint(Path(suspect) / "adapter_model.safetensors"))
    else:
        suspect_model = open_checkpoint(resolve_model_dir(suspect))
        suspect_hash = content_hash(suspect_model)
    texts = list(probes) if probes else list(DEFAULT_PROBES)
    encoder = None
    if use_probes or jacobian:
        from diverify.models import load_text_encoder
        from diverify.models.encoder import TOKENIZER_FILES
        try:
            # Checked before loading: a model without a tokenizer cannot read the probes.
            if not any((Path(base_dir) / f).is_file() for f in TOKENIZER_FILES):
                raise DiverifyError(f"base {base} has no tokenizer files")
            encoder = load_text_encoder(base_dir)
        except DiverifyError as err:
            if probes or jacobian:
                raise DiverifyError(f"probes need the base to load as a text encoder with a tokenizer: {err}") from err
            encoder = None
    probe_stats = probe_statistics(input_second_moments(encoder, texts)) if encoder is not None else None
    pairs = list(iter_matrix_pairs(base_ckpt, suspect_model)) if jacobian else iter_matrix_pairs(base_ckpt, suspect_model)
    jacobians = None
    if jacobian:
        from diverify.audit.probe import has_kernel, with_kernel_deltas
        deltas = {p.name: (p.delta.dense() if isinstance(p.delta, LowRankDelta) else p.delta)
                  for p in pairs if has_kernel(encoder.params, p.name)}
        suspect_params = with_kernel_deltas(encoder.params, deltas)
        jacobians = jacobian_sensitivities(encoder, encoder.params, suspect_params, deltas, texts)
    report = audit_pairs(pairs, probe_stats, jacobians, top_k=top_k, subspace_rank=subspace_rank,
                         n_probes=len(texts) if probe_stats is not None else 0)
    return dataclasses.replace(report, base_hash=content_hash(base_ckpt), suspect_hash=suspect_hash)
