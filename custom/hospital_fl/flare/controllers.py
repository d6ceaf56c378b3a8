"""FLARE's FedAvg, FedOpt and SCAFFOLD controllers with a per-job round policy.

Stock FLARE controllers wait for every sampled site in every round. Hospitals go down,
and a slow site should not hold up the others, so each job sets:

- ``min_responses``: updates a round needs (None: every site);
- ``round_timeout``: seconds a round waits for its sites (0: no limit);
- ``wait_after_min``: grace seconds after the minimum has arrived for the rest.

A round closes when every site has answered, or when ``min_responses`` have answered and
the grace period has passed, or at the timeout. A site that answers after its round has
closed is late: FLARE treats the answer as the result of an unknown task and drops it, so
a late update is never folded into a later round (it was trained from an older global
model). The late site receives the next round's model as soon as it asks for work again.
If a round times out with fewer than ``min_responses`` answers, FLARE ends the job.
"""

from __future__ import annotations

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.workflows.base_model_controller import BaseModelController
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_common.workflows.scaffold import Scaffold
from nvflare.app_opt.pt.fedopt_ctl import FedOpt

from hospital_fl.aggregation.strategy import AggregationConfig, aggregate_round
from hospital_fl.flare.aggregator import UpdateAggregator

__all__ = ["RoundPolicyFedAvg", "RoundPolicyFedOpt", "RoundPolicyScaffold"]


class _RoundPolicy:
    def __init__(
        self, *args, min_responses: int | None = None, round_timeout: int = 0, wait_after_min: int = 0, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.min_responses, self.round_timeout, self.wait_after_min = min_responses, round_timeout, wait_after_min

    def _policy(self, targets, min_responses, timeout) -> dict:
        n_targets = len(targets) if targets else None
        wanted = min_responses if min_responses is not None else self.min_responses
        if wanted is not None and n_targets is not None:
            wanted = min(wanted, n_targets)  # fewer sites connected than the policy's minimum
        return dict(
            min_responses=wanted,
            timeout=timeout or self.round_timeout,
            wait_time_after_min_received=self.wait_after_min if wanted else 0,
        )

    def _announce_job_rounds(self, data) -> None:
        # FLARE's FedAvg runs num_rounds rounds from start_round but announces num_rounds as the
        # total; a continuation job (start_round > 0) must announce the job's rounds, which the
        # sites' learning-rate schedule and DP plan count against.
        if isinstance(data, FLModel) and getattr(self, "start_round", 0):
            data.total_rounds = self.start_round + self.num_rounds

    def send_model(self, task_name="train", data=None, targets=None, min_responses=None, timeout=0, callback=None):
        self._announce_job_rounds(data)
        BaseModelController.broadcast_model(
            self,
            task_name=task_name,
            data=data,
            targets=targets,
            blocking=False,
            callback=callback,
            **self._policy(targets, min_responses, timeout),
        )

    def send_model_and_wait(self, task_name="train", data=None, targets=None, min_responses=None, timeout=0):
        self._announce_job_rounds(data)
        return BaseModelController.broadcast_model(
            self, task_name=task_name, data=data, targets=targets, **self._policy(targets, min_responses, timeout)
        )


class RoundPolicyFedAvg(_RoundPolicy, FedAvg):
    """FLARE's FedAvg (and FedProx, with ``fedprox_mu``) with the job's round policy."""


class RoundPolicyFedOpt(_RoundPolicy, FedOpt):
    """FLARE's FedOpt (server optimiser on the aggregated difference) with the round policy."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = str(self.device)  # torch accepts the name; the job config can only hold a string

    def update_model(self, global_model: FLModel, aggr_result: FLModel) -> FLModel:
        # FLARE's FedOpt steps its own torch copy of the model; start it from the current
        # global weights, which the persistor (not that copy) loaded at job start.
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in global_model.params.items()}
        self.torch_model.load_state_dict(state, strict=False)
        return super().update_model(global_model, aggr_result)


class RoundPolicyScaffold(_RoundPolicy, Scaffold):
    """FLARE's SCAFFOLD controller with the round policy, whose model update goes through
    the bundle's aggregator (update screening, round history) and whose control update
    averages the accepted sites' control changes with the same bounded weights, after the
    same screen as updates (finite, the majority's names, shapes and dtypes, the norm
    screen); a refused control change is recorded in the site's history entry."""

    def __init__(self, *args, aggregator: UpdateAggregator | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.aggregator = aggregator

    def aggregate(self, results: list[FLModel], aggregate_fn=None) -> FLModel:
        if self.aggregator is None:
            return super().aggregate(results, aggregate_fn)
        self.aggregator.reset_stats()
        for result in results:
            self.aggregator.accept_model(result)
        model = self.aggregator.aggregate_model()
        entries = {s["site"]: s for s in self.aggregator.history[-1]["sites"] if s["accepted"]}
        kept = [r for r in results if r.meta.get("client_name") in entries]
        controls = [r.meta.get(AlgorithmConstants.SCAFFOLD_CTRL_DIFF) for r in kept]
        declared = self.aggregator.declared or {}
        rule = self.aggregator.rule
        # No direction screen: control changes track each site's own gradient drift.
        screen = AggregationConfig(outlier_factor=rule.outlier_factor, claim_cap=rule.claim_cap, min_cosine=None)
        result = aggregate_round(
            screen,
            [c if isinstance(c, dict) else {} for c in controls],
            [r.meta.get("n_samples") for r in kept],
            declared=[declared.get(r.meta.get("client_name")) for r in kept],
        )
        for j, reason in result.rejected.items():
            entry = entries[kept[j].meta.get("client_name")]
            entry["control_reason"] = f"its SCAFFOLD control change was refused: {reason}"
            self.warning(f"round {self.current_round}: {entry['site']}: {entry['control_reason']}")
        model.meta = {
            # None accepted: the global controls stay as they were.
            AlgorithmConstants.SCAFFOLD_CTRL_DIFF: result.update or {},
            "nr_aggregated": len(kept),
            "current_round": self.current_round,
        }
        return model
