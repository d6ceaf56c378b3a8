"""FLARE ModelAggregator: screens each site's update, then combines them with the job's rule.

All maths is hospital_fl.aggregation.strategy.aggregate_round (validation, norm and
direction screens, FedAvg / trimmed mean / median / norm-bounded mean / Krum); this class
only turns FLModels into plain data and back. A bad update (NaN, wrong names, shapes or
dtypes, no sample count, a norm far above the round's median, a direction against the
round's median update) is rejected and logged with the site and the
reason while the round goes on with the others. When fewer acceptable updates remain than
the rule needs, the round leaves the global model unchanged (logged); when none remain the
round fails loudly. A round's updates are all full weights or all differences to the
global model; robust rules and central client-level DP need differences. Every round's
per-site report (metrics, sample count, training seconds, bytes on the wire, accepted or
why not) is written to round_history.json in the server's run folder after every round
(replaced atomically, so a reader mid-job or after a crash sees whole rounds only), which
travels with the job result.

Every mode runs the same screen (hospital_fl.aggregation.strategy.screen_round): with a rule,
and with central client-level DP, where the screens that compare one site with the others
(norm, direction) are off so one site cannot decide whether another counts (sensitivity).

A site's weight is its claimed sample count bounded by the image count the consortium
declared for it (``DECLARED_IMAGES_FILE`` in the server kit's local/ folder, written at
provisioning), or by k x the round's median claim where none is declared (the simulator);
every bound that bites is recorded with the site, the claimed and the allowed count. A
site whose metrics are not finite numbers, or whose payload failed to decode against the
global model's layout (``DECODE_PROBLEM_KEY``), is rejected with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.fuel.utils.log_utils import get_obj_logger

from hospital_fl.aggregation.strategy import AggregationConfig, Screening, combine_round, screen_round
from hospital_fl.aggregation.validation import metrics_problem
from hospital_fl.aggregation.weights import DECLARED_IMAGES_FILE, check_declared_counts
from hospital_fl.compression.codecs import payload_bytes
from hospital_fl.flare.recipes.resume import RESUMED_FROM_KEY
from hospital_fl.privacy.central import CentralClientDP
from hospital_fl.privacy.config import DPConfig

__all__ = [
    "UpdateAggregator",
    "HISTORY_FILE",
    "WIRE_BYTES_KEY",
    "DECODE_PROBLEM_KEY",
    "DECLARED_IMAGES_FILE",
    "read_declared_images",
    "record_weight_clips",
    "write_history",
]

HISTORY_FILE = "round_history.json"
# Set by hospital_fl.flare.filters.DecompressUpdate: the compressed size that crossed the wire.
WIRE_BYTES_KEY = "hospital_fl_wire_bytes"
# Set by DecompressUpdate when a payload does not fit the global model: why it was refused.
DECODE_PROBLEM_KEY = "hospital_fl_decode_problem"


def read_declared_images(fl_ctx: FLContext) -> dict[str, int] | None:
    """The declared image counts from the server kit's local/ folder (None: none, e.g. SimEnv)."""
    workspace = fl_ctx.get_engine().get_workspace()
    path = os.path.join(workspace.get_site_config_dir(), DECLARED_IMAGES_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return check_declared_counts(json.load(f), path)


def write_history(run_dir: str, history: list[dict]) -> str:
    """Replace ``run_dir``/round_history.json with ``history`` in one step (write aside, then rename)."""
    path = os.path.join(run_dir, HISTORY_FILE)
    partial = os.path.join(run_dir, f".{HISTORY_FILE}.partial")
    with open(partial, "w") as f:
        json.dump(history, f, indent=1, default=float)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return path


def record_weight_clips(sites: list[dict], clips: list[dict]) -> list[dict]:
    """Write each clip (``index`` into ``sites``) into its site's entry; the clips by site name."""
    named = []
    for clip in clips:
        entry = sites[clip["index"]]
        entry["claimed_samples"], entry["allowed_samples"] = clip["claimed"], clip["allowed"]
        entry["weight_basis"] = clip["basis"]
        named.append({"site": entry["site"], **{k: clip[k] for k in ("claimed", "allowed", "basis")}})
    return named


class UpdateAggregator(ModelAggregator):
    """Screens and combines the round's updates.

    Args:
        aggregation: AggregationConfig fields (rule, trim, byzantine, select, norm_bound,
            outlier_factor, claim_cap, min_cosine); None: sample-weighted FedAvg with the
            norm and direction screens and bounded weights.
        central_dp: DPConfig fields with mechanism "client-central" to add central
            client-level DP instead of the rule; None for none.
        num_rounds: the job's rounds (the central DP noise covers all of them).
        resumed_from: set in a continuation job (hospital_fl.flare.recipes.resume): the
            interrupted job, its rounds completed and its round history on the server; the
            earlier rounds head this job's history and its first round names the restart.
    """

    def __init__(
        self,
        aggregation: dict | None = None,
        central_dp: dict | None = None,
        num_rounds: int | None = None,
        resumed_from: dict | None = None,
    ):
        super().__init__()
        self.aggregation, self.central_dp, self.num_rounds = aggregation, central_dp, num_rounds
        self.resumed_from = resumed_from
        self._restart_note: dict | None = None  # a continuation's first round carries it (set at START_RUN)
        self.rule = AggregationConfig(**(aggregation or {}))
        self._central = CentralClientDP(DPConfig(**central_dp), num_rounds or 1) if central_dp else None
        self.logger = get_obj_logger(self)  # ModelAggregator skips FLComponent's init
        self.history: list[dict] = []  # one entry per round: {"round", "sites": [...], "aggregation": {...}}
        self.declared: dict[str, int] | None = None  # read from the server kit at START_RUN
        self._run_dir: str | None = None  # the server's run folder, known from START_RUN
        self._round = 0
        self.reset_stats()

    def reset_stats(self) -> None:
        self._updates: list[tuple[int, dict, object]] = []  # (index into _round_sites, params, n_samples)
        self._round_sites: list[dict] = []
        self._params_type = None

    def accept_model(self, model: FLModel) -> None:
        meta = model.meta or {}
        site = meta.get("client_name", "unknown")
        params = model.params or {}
        self._round = model.current_round if model.current_round is not None else self._round
        metrics = model.metrics or {}
        problem = meta.get(DECODE_PROBLEM_KEY) or self._type_problem(model.params_type) or metrics_problem(metrics)
        entry = {
            "site": site,
            "accepted": problem is None,
            "reason": problem,
            "n_samples": meta.get("n_samples"),
            "train_seconds": meta.get("train_seconds"),
            "payload_bytes": int(meta.get(WIRE_BYTES_KEY) or payload_bytes(params)),
            "uncompressed_bytes": payload_bytes(params),
            "metrics": metrics if metrics_problem(metrics) is None else {},
            "privacy": meta.get("privacy"),
        }
        self._round_sites.append(entry)
        if problem is not None:
            self.logger.warning(f"round {self._round}: rejected update from {site}: {problem}")
            return
        self._params_type = self._params_type or model.params_type
        self._updates.append((len(self._round_sites) - 1, params, meta.get("n_samples")))

    def _type_problem(self, params_type) -> str | None:
        if params_type not in (ParamsType.FULL, ParamsType.DIFF):
            return f"params_type must be FULL or DIFF, got {params_type}"
        if params_type == ParamsType.FULL and self._central is not None:
            return "central DP clips weight differences; this site sent full weights"
        if params_type == ParamsType.FULL and self.rule.rule != "fedavg":
            return f"{self.rule.rule} works on weight differences; this site sent full weights (export the job again)"
        if self._params_type is not None and params_type != self._params_type:
            return f"params_type {params_type} differs from this round's {self._params_type}"
        return None

    def _reject(self, index: int, reason: str) -> None:
        entry = self._round_sites[index]
        entry["accepted"], entry["reason"] = False, reason
        self.logger.warning(f"round {self._round}: rejected update from {entry['site']}: {reason}")

    def aggregate_model(self) -> FLModel:
        rnd, updates = self._round, self._updates
        entry = {"round": rnd, "sites": self._round_sites}
        if self._restart_note:
            entry[RESUMED_FROM_KEY], self._restart_note = self._restart_note, None
        self.history.append(entry)
        params_type = self._params_type
        rule = self._screen_settings(params_type)
        params = [p for _, p, _ in updates]
        screening = screen_round(
            rule, params, [n for _, _, n in updates], declared=[self._declared_for(i) for i, _, _ in updates]
        )
        self._record_screening(updates, screening)
        weight_of = {updates[j][0]: w for j, w in enumerate(screening.weights)}
        clips = [{**c, "index": updates[c["index"]][0]} for c in screening.weight_clips]
        if self._central is not None:
            combined = None
            if screening.accepted:
                combined, info = self._central.combine([params[j] for j in screening.accepted])
                entry["central_dp"] = {
                    **info,
                    "noise_multiplier": self._central.noise_multiplier,
                    "epsilon": self._central.epsilon_spent(),
                    "delta": self._central.dp.delta,
                }
        else:
            result = combine_round(rule, params, screening)
            entry["aggregation"] = {k: v for k, v in result.info.items() if k != "weight_clips"}
            if "selected" in result.info:  # Krum: which sites' updates were averaged
                entry["aggregation"]["selected"] = [
                    self._round_sites[updates[j][0]]["site"] for j in result.info["selected"]
                ]
            combined = result.update
            if combined is None and result.accepted:
                self.logger.warning(f"round {rnd}: {result.info['skipped']}; the global model stays unchanged")
                combined, params_type = {}, ParamsType.DIFF  # an empty difference leaves the model as it was
        if clips:
            entry.setdefault("aggregation", {})["weight_clips"] = record_weight_clips(self._round_sites, clips)
            self.logger.info(f"round {rnd}: claimed sample counts bounded: {entry['aggregation']['weight_clips']}")
        accepted = [s for s in self._round_sites if s["accepted"]]
        self._save_history()
        if combined is None:
            self.reset_stats()
            raise RuntimeError(f"round {rnd}: every site's update was rejected; see {HISTORY_FILE} for the reasons")
        weights = [weight_of[i] for i, s in enumerate(self._round_sites) if s["accepted"]]
        metric_names = set.intersection(*(set(s["metrics"]) for s in accepted))
        metrics = {k: float(np.average([s["metrics"][k] for s in accepted], weights=weights)) for k in metric_names}
        self.reset_stats()
        return FLModel(params_type=params_type, params=combined, metrics=metrics)

    def _earlier_rounds(self) -> list[dict]:
        """The interrupted job's rounds before the resume point, from its history on the server;
        none (logged) when that file cannot be read: the resumed rounds still name the restart."""
        path, done = self.resumed_from.get("history"), int(self.resumed_from.get("rounds_completed") or 0)
        try:
            with open(path) as f:
                earlier = [e for e in json.load(f) if int(e["round"]) < done]
        except (OSError, TypeError, ValueError, KeyError) as err:
            self.logger.warning(f"the interrupted job's round history {path} was not read ({err}); it is left out")
            return []
        return [{**e, "job_id": self.resumed_from.get("job_id")} for e in earlier]

    def _save_history(self) -> None:
        """Every round so far to the run folder; a failed write is logged and retried after the next round."""
        if self._run_dir is None:  # no START_RUN (a unit harness)
            return
        try:
            write_history(self._run_dir, self.history)
        except OSError as err:
            self.logger.warning(
                f"round {self._round}: {HISTORY_FILE} not written ({err}); retried after the next round"
            )

    def _screen_settings(self, params_type) -> AggregationConfig:
        """The one screen every mode runs, with what does not apply switched off."""
        rule = self.rule
        if self._central is not None:
            rule = rule.without_relative_screens()  # see AggregationConfig.without_relative_screens
        if params_type == ParamsType.FULL:  # full weights all point the same way: no direction to screen
            rule = dataclasses.replace(rule, min_cosine=None)
        return rule

    def _record_screening(self, updates: list, screening: Screening) -> None:
        """Each rejection (with its reason), norm and cosine in its site's history entry."""
        for j, reason in sorted(screening.rejected.items()):
            self._reject(updates[j][0], reason)
        for j, norm in enumerate(screening.norms):
            self._round_sites[updates[j][0]]["update_norm"] = norm  # nan: invalid, so not measured
        for j, cosine in enumerate(screening.cosines):
            if cosine == cosine:  # nan: not screened (rejected earlier, too few updates, screen off)
                self._round_sites[updates[j][0]]["update_cosine"] = cosine

    def _declared_for(self, index: int) -> int | None:
        return (self.declared or {}).get(self._round_sites[index]["site"])

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN:
            self.declared = read_declared_images(fl_ctx)
            job_id = fl_ctx.get_job_id()
            self._run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(job_id) if job_id else None
            if self.resumed_from:
                self.history = self._earlier_rounds()
                self._restart_note = {k: self.resumed_from.get(k) for k in ("job_id", "rounds_completed")}
        elif event_type == EventType.END_RUN:
            # Again at the end: a controller may add to the last round's entries after aggregating (SCAFFOLD).
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            write_history(run_dir, self.history)
