"""The privacy settings a job carries, as a typed frozen config.

Mechanisms:
- ``none``: no formal guarantee (a site whose policy requires DP refuses such a job).
- ``sample``: DP-SGD at each site (Opacus: Poisson sampling, per-sample clipping,
  Gaussian noise); protects each patient image against everything that leaves the site.
- ``client-local``: each site clips its whole update to ``clip_norm`` and adds Gaussian
  noise before sending; protects the site's entire dataset, costly at 5 sites.
- ``client-central``: the server clips each site's update, averages, then adds noise,
  adapting the clip norm to a target quantile; sites must trust the server with raw updates.

Stock FLARE filters (SVTPrivacy, PercentilePrivacy) have no meaningful formal guarantee and
are never one of these mechanisms.
"""

from __future__ import annotations

from dataclasses import dataclass

from hospital_fl.errors import InputError

__all__ = ["DPConfig", "MECHANISMS", "ACCOUNTANTS", "SITE_MECHANISMS", "MAX_METRICS_SHARE"]

MECHANISMS = ("none", "sample", "client-local", "client-central")
# Mechanisms a site runs itself, so its own ledger can account them.
SITE_MECHANISMS = ("sample", "client-local")
ACCOUNTANTS = ("rdp", "prv")
# The metric releases take at most this share of a job's epsilon (alone), so training keeps
# most of it: at the default target 8 the metrics get their full 1.0, at target 1 only 0.125.
MAX_METRICS_SHARE = 0.125


@dataclass(frozen=True)
class DPConfig:
    """Differential-privacy settings of one job.

    Attributes:
        mechanism: one of MECHANISMS.
        target_epsilon: the total epsilon the job spends at a site, every release
            included: the metric releases are calibrated first (``metrics_budget``), then
            the training noise is the smallest whose composition with them (the chosen
            accountant) stays at or below this, over all rounds and local epochs. Under
            client-central it is the server's model release; the site's own metric
            releases stay within it too.
        delta: the delta of (epsilon, delta)-DP; a site also requires delta < 1/n.
        max_grad_norm: per-sample gradient clip norm of DP-SGD.
        clip_norm: client-level update clip norm (initial value when adaptive).
        adaptive_clip: client-central only: move the clip norm toward ``target_quantile``
            of the sites' update norms (Andrew et al. 2021), from a noisy count.
        target_quantile / clip_learning_rate: the adaptive clipping settings.
        metrics_epsilon: epsilon of the monitoring metrics a site sends (loss, gradient
            norm, sample count) taken alone, capped at MAX_METRICS_SHARE of
            target_epsilon (``metrics_budget``); part of the job's total, not added to it.
        accountant: "rdp" or "prv" (Opacus accountants).
        optimizer / learning_rate / momentum: the optimiser fed the noisy gradients: "adamw"
            (default, lr 0.002 as non-private training) or "sgd" with momentum. Measured on
            the embedded data (bench/), AdamW kept more AUC at every epsilon (3-seed means at
            eps 1/3/8: 0.905/0.909/0.909 against SGD lr 0.1: 0.778/0.867/0.907).
    """

    mechanism: str = "none"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    clip_norm: float = 1.0
    adaptive_clip: bool = True
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    metrics_epsilon: float = 1.0
    accountant: str = "rdp"
    optimizer: str = "adamw"
    learning_rate: float = 0.002
    momentum: float = 0.9

    def __post_init__(self):
        checks = [
            ("privacy.mechanism", self.mechanism in MECHANISMS, f"it must be one of {MECHANISMS}", "use sample"),
            ("privacy.accountant", self.accountant in ACCOUNTANTS, "it must be rdp or prv", "use rdp"),
            ("privacy.target_epsilon", self.target_epsilon > 0, "epsilon must be > 0", "use e.g. 8 or 3"),
            ("privacy.delta", 0 < self.delta < 1, "delta must lie in (0, 1) and below 1/n", "use e.g. 1e-5"),
            ("privacy.max_grad_norm", self.max_grad_norm > 0, "a clipping norm must be > 0", "use e.g. 1.0"),
            ("privacy.clip_norm", self.clip_norm > 0, "a clipping norm must be > 0", "use e.g. 1.0"),
            ("privacy.target_quantile", 0 < self.target_quantile < 1, "it must lie in (0, 1)", "use 0.5"),
            ("privacy.clip_learning_rate", self.clip_learning_rate > 0, "it must be > 0", "use 0.2"),
            ("privacy.metrics_epsilon", self.metrics_epsilon > 0, "epsilon must be > 0", "use e.g. 1.0"),
            ("privacy.optimizer", self.optimizer in ("sgd", "adamw"), "it must be adamw or sgd", "use adamw"),
            (
                "privacy.learning_rate",
                0 < self.learning_rate < 1,
                "it must lie in (0, 1)",
                "use 0.002 (adamw) or 0.1 (sgd)",
            ),
            ("privacy.momentum", 0 <= self.momentum < 1, "it must lie in [0, 1)", "use 0.9"),
        ]
        for name, ok, rule, fix in checks:
            if not ok:
                raise InputError(name, getattr(self, name.split(".")[1]), rule, fix)

    @property
    def enabled(self) -> bool:
        return self.mechanism != "none"

    @property
    def metrics_budget(self) -> float:
        """Epsilon the metric releases are calibrated to alone: ``metrics_epsilon``, never
        more than MAX_METRICS_SHARE of the job's total (a cap can only add noise)."""
        return min(self.metrics_epsilon, self.target_epsilon * MAX_METRICS_SHARE)

    @property
    def at_site(self) -> bool:
        """Whether the site itself runs (and accounts) the training mechanism."""
        return self.mechanism in SITE_MECHANISMS

    def check_delta_for(self, n_samples: int, where: str) -> None:
        """delta must be below 1/n, or the mechanism may expose one whole record."""
        if not self.delta < 1.0 / max(n_samples, 1):
            raise InputError(
                "privacy.delta",
                self.delta,
                f"it must be below 1/n = {1.0 / n_samples:.3g} for the {n_samples} records at {where}",
                f"use delta <= {0.1 / n_samples:.1g}",
            )
