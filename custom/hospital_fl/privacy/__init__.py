"""Differential privacy: configs, Opacus accounting, the per-site ledger and budget policy."""
