"""A CXR executor whose named sites lie in what they send, for the payload-screening tests.

Every simulated site runs it; only the sites named in ``lies`` misbehave: "bomb" replaces
the update by an already-encoded top-k payload of a few bytes that names a 50-million-value
tensor (decoded naively: 200 MB); "text_metric" reports its validation AUC as text. Sites
import it through PYTHONPATH, which the test sets.
"""

import numpy as np
from hospital_fl.compression.codecs import CompressionConfig, encode
from hospital_fl.flare.executor import CXRTrainExecutor
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

BOMB_VALUES = 50_000_000


def bomb_payload(update: dict) -> dict:
    """A valid-looking top-k payload whose first tensor claims BOMB_VALUES values."""
    payload, _ = encode(update, CompressionConfig("topk", 0.01, error_feedback=False))
    first = next(k for k in update if np.asarray(update[k]).dtype.kind == "f")
    one = {"idx": np.zeros(1, np.int32), "val": np.ones(1, np.float32)}
    payload[first] = {**one, "shape": [BOMB_VALUES], "dtype": "<f4"}
    return payload


class LyingSiteExecutor(CXRTrainExecutor):
    def __init__(self, lies: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.lies = dict(lies or {})

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        reply = super().execute(task_name, shareable, fl_ctx, abort_signal)
        lie = self.lies.get(fl_ctx.get_identity_name())
        if lie is None or task_name != "train":
            return reply
        model = FLModelUtils.from_shareable(reply)
        if lie == "bomb":
            model.params = bomb_payload(model.params)
        else:
            model.metrics = {**(model.metrics or {}), "val_auc": "high"}
            model.meta.pop("initial_metrics", None)  # FLARE would send these instead
        return FLModelUtils.to_shareable(model)
