"""Matplotlib for the clinical plots: the report's non-interactive backend and figure saving."""

from __future__ import annotations

import matplotlib.pyplot as plt

from hospital_fl.evaluation.plots import save_figure  # importing it selects the Agg backend

__all__ = ["plt", "save_figure"]
