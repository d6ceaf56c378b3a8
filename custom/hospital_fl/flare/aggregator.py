"""FLARE ModelAggregator: checks each update, then sample-weighted averaging.

A bad update (NaN, wrong shapes, missing sample count) is rejected and logged while the
round goes on with the remaining sites. Every round's per-site report (metrics, sample
count, training seconds, accepted or why not) is written to round_history.json in the
server's run folder, which travels with the job result.
"""

from __future__ import annotations

import json
import os

import numpy as np
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.fuel.utils.log_utils import get_obj_logger

from hospital_fl.aggregation.weighted import update_problem, weighted_mean

__all__ = ["SampleWeightedAggregator", "HISTORY_FILE"]

HISTORY_FILE = "round_history.json"


def _payload_bytes(params: dict) -> int:
    return int(sum(np.asarray(v).nbytes for v in params.values()))


class SampleWeightedAggregator(ModelAggregator):
    """Weighted FedAvg by each site's training sample count, with update checks."""

    def __init__(self):
        super().__init__()
        self.logger = get_obj_logger(self)  # ModelAggregator skips FLComponent's init
        self._accepted: list[tuple[dict, int]] = []
        self._round_sites: list[dict] = []
        self.history: list[dict] = []  # one entry per round: {"round", "sites": [...]}
        self._round = 0

    def accept_model(self, model: FLModel) -> None:
        meta = model.meta or {}
        site = meta.get("client_name", "unknown")
        n_samples = meta.get("n_samples")
        reference = self._accepted[0][0] if self._accepted else None
        problem = update_problem(model.params or {}, n_samples, reference)
        if problem is None and model.params_type != ParamsType.FULL:
            problem = f"params_type must be FULL, got {model.params_type}"
        self._round = model.current_round if model.current_round is not None else self._round
        self._round_sites.append(
            {
                "site": site,
                "accepted": problem is None,
                "reason": problem,
                "n_samples": n_samples,
                "train_seconds": meta.get("train_seconds"),
                "payload_bytes": _payload_bytes(model.params or {}),
                "metrics": model.metrics or {},
            }
        )
        if problem is not None:
            self.logger.warning(f"round {self._round}: rejected update from {site}: {problem}")
            return
        self._accepted.append((model.params, int(n_samples)))

    def aggregate_model(self) -> FLModel:
        rnd = self._round
        self.history.append({"round": rnd, "sites": self._round_sites})
        if not self._accepted:
            raise RuntimeError(f"round {rnd}: every site's update was rejected; see {HISTORY_FILE} for the reasons")
        weights = [n for _, n in self._accepted]
        params = weighted_mean([p for p, _ in self._accepted], weights)
        metric_names = set.intersection(*(set(s["metrics"]) for s in self._round_sites if s["accepted"]))
        metrics = {
            k: float(np.average([s["metrics"][k] for s in self._round_sites if s["accepted"]], weights=weights))
            for k in metric_names
        }
        self.reset_stats()
        return FLModel(params_type=ParamsType.FULL, params=params, metrics=metrics)

    def reset_stats(self) -> None:
        self._accepted, self._round_sites = [], []

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.END_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            with open(os.path.join(run_dir, HISTORY_FILE), "w") as f:
                json.dump(self.history, f, indent=1, default=float)
