"""FLARE Executor that runs one CXR training round at a hospital.

The executor ships with the installed package and is named by path in the job config
(``hospital_fl.flare.executor.CXRTrainExecutor``, in every exported job and each site's
class allow list), so a job folder carries no code (no BYOC permission needed at
hospitals). It builds the chest X-ray site algorithm (hospital_fl.training.site_round) from
the job's arguments; hospital_fl.flare.site_executor answers the tasks, opens the site's
privacy gate and records each DP round's releases in the site's ledger.
"""

from __future__ import annotations

from hospital_fl.data.splits import SplitConfig
from hospital_fl.flare.site_executor import (
    FINAL_MODEL_FILE,
    SAMPLE_COUNT_TASK,
    TRAIN_TASK,
    VALIDATE_TASK,
    SiteExecutor,
    keep_final_model,
)
from hospital_fl.models.cxr import ModelConfig
from hospital_fl.privacy.config import DPConfig
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.site_round import CXRSiteAlgorithm

__all__ = [
    "FINAL_MODEL_FILE",
    "SAMPLE_COUNT_TASK",
    "TRAIN_TASK",
    "VALIDATE_TASK",
    "CXRTrainExecutor",
    "keep_final_model",
]


class CXRTrainExecutor(SiteExecutor):
    """Trains the CXR classifier on this hospital's data for each "train" task.

    Each task: score the received global model on the site's validation and local test
    portions, train it for ``train["epochs"]`` epochs, and send back the difference to the
    received weights with the sample count (the aggregation weight) and the seconds spent
    training. Under FLARE's SCAFFOLD controller the site also keeps its control variate
    and returns its change. With a DP mechanism a refused job answers every task with an
    error and the reason in the site's log.

    Args:
        split: SplitConfig fields (which images this site holds in the embedded dataset).
        model: ModelConfig fields (must match the server's initial model).
        train: TrainConfig fields (local epochs per round, optimiser, device, AMP).
        data_path: a MedMNIST-layout .npz instead of the embedded dataset.
        site_data: the site's own dataset folder made by ``hospital-fl ingest`` (manifest.json +
            images.npy) instead of the embedded dataset; "{site}" is replaced by this
            site's FLARE name and "${VAR}" by the site's environment variable. Consent is re-checked against the site's registry when the
            job starts, and the job's use of each patient is recorded at the site.
        privacy: DPConfig fields (mechanism "none" by default).
        num_rounds: the job's rounds, which a DP job's noise and planned spend cover; a
            task announcing more rounds is refused.
    """

    def __init__(
        self,
        split: dict | None = None,
        model: dict | None = None,
        train: dict | None = None,
        data_path: str | None = None,
        privacy: dict | None = None,
        num_rounds: int | None = None,
        site_data: str | None = None,
    ):
        # Validated at construction: a bad setting fails the job start, not round 1.
        super().__init__(
            CXRSiteAlgorithm(
                SplitConfig(**(split or {})),
                ModelConfig(**(model or {})),
                TrainConfig(**(train or {})),
                DPConfig(**(privacy or {})),
                num_rounds=num_rounds,
                data_path=data_path,
                site_data=site_data,
            )
        )
        # Kept under the argument names: FLARE's job export reads them back into the config.
        self._split, self._model, self._train, self._privacy = split, model, train, privacy
        self.data_path, self.site_data, self.num_rounds = data_path, site_data, num_rounds

    _always_serialize_args = ("split", "model", "train", "privacy", "num_rounds")
