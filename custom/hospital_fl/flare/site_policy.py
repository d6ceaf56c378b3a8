"""Site-side FLARE policy that lets jobs name hospital_fl classes.

FLARE 2.9 builds only components whose class path a site allows (``class_allow_list`` in
the site's local/resources.json). Sites that run this bundle add the ``hospital_fl.``
prefix and the few FLARE classes its jobs use beyond FLARE's default list (stock jobs
avoid the list by shipping code, which needs BYOC rights; ours ship none). Nothing else is
widened, and BYOC stays off.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST

__all__ = ["BUNDLE_ALLOW_LIST", "allow_bundle_components", "is_allowed"]

BUNDLE_ALLOW_LIST = (
    "hospital_fl.",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
    # the FedOpt job's server optimiser and its constant learning-rate schedule
    "torch.optim.Adam",
    "torch.optim.SGD",
    "torch.optim.lr_scheduler.ConstantLR",
)


def is_allowed(class_path: str, allow_list=tuple(DEFAULT_CLASS_ALLOW_LIST) + BUNDLE_ALLOW_LIST) -> bool:
    """Whether a site with this bundle's policy builds ``class_path`` (FLARE's prefix rule)."""
    return any(
        class_path == entry or class_path.startswith(entry if entry.endswith(".") else entry + ".")
        for entry in allow_list
    )


def allow_bundle_components(local_dir: str | Path) -> Path:
    """Add BUNDLE_ALLOW_LIST to the class allow list in ``local_dir``/resources.json.

    Keeps every other setting already in resources.json (or resources.json.default).
    """
    local_dir = Path(local_dir)
    target = local_dir / "resources.json"
    source = target if target.exists() else local_dir / "resources.json.default"
    resources = json.loads(source.read_text()) if source.exists() else {"format_version": 2}
    # An explicit list (even an empty one) is the site's decision: extend it, never replace it.
    allowed = list(resources[CLASS_ALLOW_LIST] if CLASS_ALLOW_LIST in resources else DEFAULT_CLASS_ALLOW_LIST)
    allowed += [entry for entry in BUNDLE_ALLOW_LIST if entry not in allowed]
    resources[CLASS_ALLOW_LIST] = allowed
    local_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(resources, indent=2))
    return target
