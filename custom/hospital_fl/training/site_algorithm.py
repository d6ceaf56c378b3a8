"""What one hospital does in a federated job, as an interface on plain data.

A site algorithm reads and checks its site's data once when the job starts, trains one
round from the weights the server sends, scores a model on the site's own held-out data,
and says what it withholds (a DP site keeps its counts and scores). It knows nothing of
FLARE: ``hospital_fl.flare.site_executor.SiteExecutor`` turns FLARE's tasks into these
calls, opens the site's privacy gate and builds every reply, once for all algorithms.

Implemented by ``training.site_round.CXRSiteAlgorithm`` (chest X-ray classification) and
``segmentation.site_round.SegSiteAlgorithm`` (brain-tumour segmentation).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from hospital_fl.privacy.accounting import Release
from hospital_fl.privacy.config import DPConfig

__all__ = ["RoundTask", "SiteAlgorithm", "SiteJob", "SiteLog", "SiteReleases", "SiteScores", "SiteUpdate"]

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class SiteJob:
    """The site and job a run gives an algorithm when it starts.

    Attributes:
        site: the site's name in the federation.
        job_id: the job's id (None outside a federation, e.g. a unit harness).
        workspace: the site's writable workspace root (None without one).
        run_dir: this job's run folder in that workspace (None without one).
    """

    site: str
    job_id: str | None = None
    workspace: str | None = None
    run_dir: str | None = None


@dataclass(frozen=True)
class RoundTask:
    """One training round as the server sent it.

    Attributes:
        weights: the global weights to start from.
        round_index: the round, counted from 0.
        total_rounds: the rounds the server announced (None when it did not say).
        fedprox_mu: FedProx proximal weight (0: FedAvg).
        server_control: SCAFFOLD's server control variate when the server runs SCAFFOLD.
    """

    weights: Weights
    round_index: int = 0
    total_rounds: int | None = None
    fedprox_mu: float = 0.0
    server_control: Mapping[str, np.ndarray] | None = None


@dataclass(frozen=True)
class SiteUpdate:
    """What a round sends (weights, metrics, n_samples) and what stays at the site (local_metrics).

    Attributes:
        params_type: "DIFF" when ``weights`` is trained minus received weights.
        n_samples: the aggregation weight (under DP a noised count).
        control_delta: SCAFFOLD: the change of this site's control variate (sent), else None.
    """

    weights: Weights
    metrics: dict[str, float]
    n_samples: int
    train_seconds: float
    params_type: Literal["FULL", "DIFF"] = "FULL"
    local_metrics: dict[str, float] = field(default_factory=dict)
    control_delta: Weights | None = None


@dataclass(frozen=True)
class SiteScores:
    """A model's scores on the site's held-out data: what is sent, what stays, and counts sent with them.

    Attributes:
        metrics: the scores that leave the site (empty where the site keeps them).
        local_metrics: every score computed, for the site's own log.
        meta: plain values sent alongside (e.g. {"n_test": count or None}).
    """

    metrics: dict[str, float]
    local_metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class SiteLog(Protocol):
    """Where an algorithm reports what it found in the site's data (a ``logging.Logger`` fits)."""

    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...


class SiteReleases(Protocol):
    """A job's DP releases at a site (``SitePrivacy`` fits): the site's privacy gate checks the
    plan before anything trains and records each round's releases before the round trains."""

    total_rounds: int  # the rounds the noise and the planned spend cover

    def planned_releases(self) -> dict[str, Release]: ...

    def round_releases(self) -> dict[str, Release]: ...

    def noise_summary(self) -> dict:
        """The calibrated mechanisms, for the site's own log only (they reveal the record count)."""
        ...

    def reply_summary(self) -> dict:
        """What a reply may say about the site's privacy (independent of the record count)."""
        ...


@runtime_checkable
class SiteAlgorithm(Protocol):
    """One site's part of a federated job, on plain data.

    Attributes:
        job: what the site trains, as a refusal names it (e.g. "segmentation").
        dp: the job's DP settings (mechanism "none" without DP); None for an algorithm that
            never applies DP, which a site whose policy requires DP refuses before reading data.
    """

    job: str
    dp: DPConfig | None

    def load(self, job: SiteJob, log: SiteLog) -> None:
        """Read and check the site's data for the job; a no-op once loaded.

        Raises:
            Exception: any failure (InputError naming the fix where known) refuses the job.
        """
        ...

    def release_plan(self) -> SiteReleases | None:
        """The job's DP releases at this site, built for the loaded data; None without DP.

        Raises:
            InputError: the DP settings do not fit the site's data.
        """
        ...

    def sample_count(self) -> int | None:
        """The site's aggregation weight before any round (None: withheld)."""
        ...

    def train_round(self, task: RoundTask) -> SiteUpdate:
        """Score the received weights at the site, then train them for one round."""
        ...

    def score(self, weights: Weights) -> SiteScores:
        """Score a (final) model on the site's own held-out data."""
        ...
