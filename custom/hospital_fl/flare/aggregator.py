"""FLARE ModelAggregator: checks each update, then sample-weighted averaging.

A bad update (NaN, wrong shapes, missing sample count) is rejected and logged while the
round goes on with the remaining sites. A round's updates are all full weights or all
differences to the global model (what DP sites send); a site sending the other kind is
rejected. With central client-level DP the accepted differences are clipped, averaged with
equal weights and noised (hospital_fl.privacy.central) instead of sample-weighted. Every round's per-site report (metrics, sample
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

from hospital_fl.aggregation.validation import update_problem
from hospital_fl.aggregation.weighted import weighted_mean
from hospital_fl.privacy.central import CentralClientDP
from hospital_fl.privacy.config import DPConfig

__all__ = ["SampleWeightedAggregator", "HISTORY_FILE"]

HISTORY_FILE = "round_history.json"


def _payload_bytes(params: dict) -> int:
    return int(sum(np.asarray(v).nbytes for v in params.values()))


class SampleWeightedAggregator(ModelAggregator):
    """Weighted FedAvg by each site's training sample count, with update checks.

    Args:
        central_dp: DPConfig fields with mechanism "client-central" to add central
            client-level DP; None for plain weighted averaging.
        num_rounds: the job's rounds (the central DP noise covers all of them).
    """

    def __init__(self, central_dp: dict | None = None, num_rounds: int | None = None):
        super().__init__()
        self.central_dp, self.num_rounds = central_dp, num_rounds
        self._central = CentralClientDP(DPConfig(**central_dp), num_rounds or 1) if central_dp else None
        self.logger = get_obj_logger(self)  # ModelAggregator skips FLComponent's init
        self._accepted: list[tuple[dict, int]] = []
        self._round_sites: list[dict] = []
        self.history: list[dict] = []  # one entry per round: {"round", "sites": [...]}
        self._round = 0
        self._params_type = None

    def accept_model(self, model: FLModel) -> None:
        meta = model.meta or {}
        site = meta.get("client_name", "unknown")
        n_samples = meta.get("n_samples")
        reference = self._accepted[0][0] if self._accepted else None
        problem = update_problem(model.params or {}, n_samples, reference)
        expected = self._expected_type()
        if problem is None and model.params_type not in (ParamsType.FULL, ParamsType.DIFF):
            problem = f"params_type must be FULL or DIFF, got {model.params_type}"
        if problem is None and expected is not None and model.params_type != expected:
            problem = f"params_type {model.params_type} differs from this round's {expected}"
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
                "privacy": meta.get("privacy"),
            }
        )
        if problem is not None:
            self.logger.warning(f"round {self._round}: rejected update from {site}: {problem}")
            return
        self._accepted.append((model.params, int(n_samples)))
        self._params_type = model.params_type

    def _expected_type(self):
        if self._central is not None:
            return ParamsType.DIFF  # central DP clips differences, never full weights
        return self._params_type if self._accepted else None

    def aggregate_model(self) -> FLModel:
        rnd = self._round
        entry = {"round": rnd, "sites": self._round_sites}
        self.history.append(entry)
        if not self._accepted:
            raise RuntimeError(f"round {rnd}: every site's update was rejected; see {HISTORY_FILE} for the reasons")
        weights = [n for _, n in self._accepted]
        if self._central is not None:
            params, info = self._central.combine([p for p, _ in self._accepted])
            entry["central_dp"] = {
                **info,
                "noise_multiplier": self._central.noise_multiplier,
                "epsilon": self._central.epsilon_spent(),
                "delta": self._central.dp.delta,
            }
        else:
            params = weighted_mean([p for p, _ in self._accepted], weights)
        metric_names = set.intersection(*(set(s["metrics"]) for s in self._round_sites if s["accepted"]))
        metrics = {
            k: float(np.average([s["metrics"][k] for s in self._round_sites if s["accepted"]], weights=weights))
            for k in metric_names
        }
        params_type = self._params_type
        self.reset_stats()
        return FLModel(params_type=params_type, params=params, metrics=metrics)

    def reset_stats(self) -> None:
        self._accepted, self._round_sites = [], []
        self._params_type = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.END_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            with open(os.path.join(run_dir, HISTORY_FILE), "w") as f:
                json.dump(self.history, f, indent=1, default=float)
