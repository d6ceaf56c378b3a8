"""A CXR executor whose one named site misbehaves, for fault-tolerance tests in FLARE.

Every site runs it; only ``faulty_site`` sends NaN weights (fault "nan") or answers
``delay`` seconds late in round 0 (fault "slow"). Simulated sites import it through
PYTHONPATH, which the tests set.
"""

import time

import numpy as np
from hospital_fl.flare.executor import CXRTrainExecutor
from nvflare.app_common.utils.fl_model_utils import FLModelUtils


class FaultySiteExecutor(CXRTrainExecutor):
    def __init__(self, faulty_site: str = "site-3", fault: str = "nan", delay: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.faulty_site, self.fault, self.delay = faulty_site, fault, delay

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        mine = fl_ctx.get_identity_name() == self.faulty_site
        round_ = FLModelUtils.from_shareable(shareable).current_round
        if mine and self.fault == "slow" and round_ == 0:
            time.sleep(self.delay)
        reply = super().execute(task_name, shareable, fl_ctx, abort_signal)
        if mine and self.fault == "nan":
            model = FLModelUtils.from_shareable(reply)
            model.params = {k: np.full_like(v, np.nan) for k, v in model.params.items()}
            reply = FLModelUtils.to_shareable(model)
        return reply
