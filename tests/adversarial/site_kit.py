"""A hospital's FLARE side for the privacy tests: a real FLARE Workspace on the site's kit
folder, the FLContext FLARE hands an executor, and how a refused task's reply reads."""

from __future__ import annotations

from pathlib import Path

from flare_messages import site_with_engine
from hospital_fl.privacy.ledger import PrivacyLedger
from hospital_fl.privacy.policy import SitePrivacyPolicy
from hospital_fl.privacy.setup import init_site_privacy
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

SITE = "site-3"  # a small embedded hospital: DP-SGD rounds take a second
FAST = {"augment": False, "device": "cpu", "torch_threads": 1, "epochs": 1}


def site_ctx(kit: Path, job_id: str = "job-1") -> FLContext:
    return site_with_engine(kit, SITE, job_id)


def make_kit(tmp_path: Path, **policy) -> Path:
    """A site kit folder with its policy, ledger key and empty ledger (``privacy init``)."""
    kit = tmp_path / "kit"
    (kit / "startup").mkdir(parents=True)  # a FLARE workspace holds its kit's startup/ folder
    init_site_privacy(kit, SITE, SitePrivacyPolicy(**policy))
    return kit


def ledger_of(kit: Path) -> PrivacyLedger:
    return PrivacyLedger(kit / "privacy" / "ledger.json")


def train_task(weights, current_round: int, total_rounds: int) -> Shareable:
    model = FLModel(params_type=ParamsType.FULL, params=weights, current_round=current_round, total_rounds=total_rounds)
    return FLModelUtils.to_shareable(model)


def refusal(reply: Shareable) -> str:
    """The reason a site gave for refusing a task; asserts nothing but the error was sent."""
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert set(reply.keys()) <= {ReservedHeaderKey.HEADERS}
    return str(reply.get_header(ReservedHeaderKey.ERROR))
