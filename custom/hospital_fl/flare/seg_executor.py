"""FLARE Executor that runs one brain-tumour segmentation round at a hospital.

Named by path in the job config (``hospital_fl.flare.seg_executor.SegTrainExecutor``), so a
job folder carries no code. It builds the segmentation site algorithm
(hospital_fl.segmentation.site_round) from the job's arguments; hospital_fl.flare.site_executor
answers the tasks. The site's datalist is validated when the job starts, before anything
trains: cases with a problem are listed in the site's log (and in ``seg_datalist_report.json``
in the site's run folder) and left out, the rest train; a site with no usable training case
refuses the job with the report's reason.

Like the CXR executor it also answers an HE job's ``sample_count`` and final ``validate``
tasks, so the HE filters (hospital_fl.flare.he) and compression filters apply unchanged.

Segmentation training has no differential privacy in this bundle, so the job passes the
site's privacy gate as a job without DP: a site whose policy requires DP refuses it before
anything trains, and answers every task with the reason and the fix.
"""

from __future__ import annotations

from hospital_fl.flare.site_executor import SiteExecutor
from hospital_fl.models.seg import SegModelConfig
from hospital_fl.segmentation.pipeline import SegPipelineConfig, SegTrainConfig
from hospital_fl.segmentation.site_round import REPORT_FILE, SegSiteAlgorithm

__all__ = ["REPORT_FILE", "SegTrainExecutor"]


class SegTrainExecutor(SiteExecutor):
    """Trains the segmentation network on this hospital's datalist for each "train" task.

    Each task: score the received global model on the site's validation cases (Dice per
    region), train it for ``train["epochs"]`` epochs of label-aware crops, and send back
    the difference to the received weights with the number of training cases.

    Args:
        datalist: the site's datalist JSON; "{site}" is replaced by this site's FLARE name
            and "${VAR}" by the site's environment variable.
        model: SegModelConfig fields (must match the server's initial model).
        pipeline: SegPipelineConfig fields (spacing, crop size, label scheme).
        train: SegTrainConfig fields.
        num_rounds: the job's rounds (the learning-rate schedule spans them).
    """

    def __init__(
        self,
        datalist: str = "${HOSPITAL_FL_SEG_DATALIST}",
        model: dict | None = None,
        pipeline: dict | None = None,
        train: dict | None = None,
        num_rounds: int = 1,
    ):
        super().__init__(
            SegSiteAlgorithm(
                datalist,
                SegModelConfig(**(model or {})),
                SegPipelineConfig(**(pipeline or {})),
                SegTrainConfig(**(train or {})),
            )
        )
        # Kept under the argument names: FLARE's job export reads them back into the config.
        self.datalist, self.model, self.pipeline, self.train, self.num_rounds = (
            datalist,
            model,
            pipeline,
            train,
            num_rounds,
        )

    _always_serialize_args = ("datalist", "model", "pipeline", "train", "num_rounds")
