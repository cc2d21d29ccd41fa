"""Parameter-level audit (PLA) of weight deltas: spectral and data-aware metrics, verdict, policy gate.

``audit_models(base, suspect)`` is the entry point (what ``diverify audit``
runs); :mod:`~diverify.audit.spectral` holds the per-matrix metrics,
:mod:`~diverify.audit.probe` the data-aware ones, :mod:`~diverify.audit.weights`
base/suspect pairs from checkpoints and LoRA adapters, :mod:`~diverify.audit.report` the verdict
and policy gate, and :mod:`~diverify.audit.edits` the seeded planted-edit and
benign-delta generator used to test and benchmark the audit.
"""

from diverify.audit.report import (AuditReport, MatrixAudit, Policy, audit_models, audit_pairs, load_policy,
                                   policy_violations)
from diverify.audit.spectral import LowRankDelta, SpectralMetrics, matrix_kind, spectral_metrics
from diverify.audit.weights import LoraAdapter, MatrixPair, open_lora_adapter
from diverify.safetensors_io import Checkpoint, open_checkpoint

__all__ = ["AuditReport", "Checkpoint", "LoraAdapter", "LowRankDelta", "MatrixAudit", "MatrixPair", "Policy",
           "SpectralMetrics", "audit_models", "audit_pairs", "load_policy", "matrix_kind", "open_checkpoint",
           "open_lora_adapter", "policy_violations", "spectral_metrics"]
