"""Certified weight smoothing: exact statistics, seeded sharded sampling, certificates."""
