"""What a job shows while it runs: the site adapter streams exactly what its reply carries
(under DP only the released figures), and the server's round history is on disk after every
round, not only when the job ends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flare_messages import ClientEngine, site_with_engine
from hospital_fl.flare.aggregator import HISTORY_FILE, UpdateAggregator
from hospital_fl.flare.site_executor import TRAIN_SECONDS_TAG, SiteExecutor
from hospital_fl.training.site_algorithm import RoundTask, SiteJob, SiteLog, SiteScores, SiteUpdate
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsData
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils


def _context(tmp_path: Path, name: str, job: str = "job-1"):
    for folder in ("startup", "local", job):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    ctx = site_with_engine(tmp_path, name, job)
    return ctx, ctx.get_engine()


class _PrivateSite:
    """A site whose reply carries only released figures and keeps its exact scores."""

    job, dp = "private", None

    def load(self, job: SiteJob, log: SiteLog) -> None: ...

    def release_plan(self):
        return None

    def sample_count(self) -> int:
        return 10

    def train_round(self, task: RoundTask) -> SiteUpdate:
        return SiteUpdate(
            weights={"w": np.zeros(2)},
            metrics={"train_loss": 0.25, "grad_norm": 1.5},
            n_samples=10,
            train_seconds=0.75,
            params_type="DIFF",
            local_metrics={"val_auc": 0.91, "test_auc": 0.88, "train_loss": 0.2},
        )

    def score(self, weights) -> SiteScores:
        return SiteScores({})


def _streamed(engine: ClientEngine) -> dict[str, tuple[int, float]]:
    out = {}
    for event_type, data in engine.events:
        if event_type == ANALYTIC_EVENT_TYPE:
            record = AnalyticsData.from_dxo(from_shareable(data))
            out[record.tag] = (record.step, record.value)
    return out


def test_a_round_streams_the_reply_metrics_and_nothing_the_site_keeps(tmp_path):
    ctx, engine = _context(tmp_path, "site-1")
    task = FLModelUtils.to_shareable(FLModel(ParamsType.FULL, {"w": np.ones(2)}, current_round=3, total_rounds=5))

    reply = FLModelUtils.from_shareable(SiteExecutor(_PrivateSite()).execute("train", task, ctx, Signal()))

    streamed = _streamed(engine)
    assert streamed == {"train_loss": (3, 0.25), "grad_norm": (3, 1.5), TRAIN_SECONDS_TAG: (3, 0.75)}
    assert {k: v for k, (_, v) in streamed.items() if k != TRAIN_SECONDS_TAG} == reply.metrics
    assert "val_auc" not in streamed and "test_auc" not in streamed


def test_an_aborted_round_streams_nothing(tmp_path):
    ctx, engine = _context(tmp_path, "site-1")
    task = FLModelUtils.to_shareable(FLModel(ParamsType.FULL, {"w": np.ones(2)}, current_round=0, total_rounds=1))
    aborted = Signal()
    aborted.trigger("stop")

    SiteExecutor(_PrivateSite()).execute("train", task, ctx, aborted)

    assert _streamed(engine) == {}


def _update(site: str, w: float, rnd: int) -> FLModel:
    return FLModel(
        params_type=ParamsType.FULL,
        params={"w": np.full(2, w, dtype=np.float32)},
        metrics={"val_auc": 0.7},
        current_round=rnd,
        meta={"client_name": site, "n_samples": 10, "train_seconds": 0.5},
    )


def test_the_round_history_is_on_disk_after_each_round_before_the_job_ends(tmp_path):
    ctx, _ = _context(tmp_path, "server")
    aggregator = UpdateAggregator()
    aggregator.handle_event(EventType.START_RUN, ctx)
    history = tmp_path / "job-1" / HISTORY_FILE

    for rnd in range(2):
        aggregator.accept_model(_update("site-1", 1.0, rnd))
        aggregator.accept_model(_update("site-2", np.nan, rnd))  # rejected, with its reason
        aggregator.aggregate_model()
        saved = json.loads(history.read_text())
        assert [e["round"] for e in saved] == list(range(rnd + 1))
        assert saved == json.loads(json.dumps(aggregator.history, default=float))

    rejected = next(s for s in saved[-1]["sites"] if s["site"] == "site-2")
    assert not rejected["accepted"] and "NaN" in rejected["reason"]
    assert sorted(p.name for p in history.parent.iterdir()) == [HISTORY_FILE]  # no partial file left behind


def test_a_history_write_that_fails_does_not_stop_the_round(tmp_path):
    ctx, _ = _context(tmp_path, "server")
    aggregator = UpdateAggregator()
    aggregator.handle_event(EventType.START_RUN, ctx)
    (tmp_path / "job-1").rmdir()  # the run folder is gone: the write fails

    aggregator.accept_model(_update("site-1", 1.0, 0))
    result = aggregator.aggregate_model()

    assert result.params["w"] == pytest.approx([1.0, 1.0])
    assert len(aggregator.history) == 1
