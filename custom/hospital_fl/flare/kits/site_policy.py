"""Site-side FLARE policy that lets jobs name hospital_fl classes.

FLARE 2.9 builds only components whose class path a site allows (``class_allow_list`` in
the site's local/resources.json). Sites that run this bundle add the exact classes its jobs
use (hospital_fl.provisioning.allowed_components), never a package prefix: FLARE builds any
callable a config names, and ``hospital_fl.`` also holds functions that write files. Stock
jobs avoid the list by shipping code, which needs BYOC rights; ours ship none. Nothing else
is widened, and BYOC stays off.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST

from hospital_fl.provisioning.allowed_components import APPROVED_CLASSES

__all__ = ["BUNDLE_ALLOW_LIST", "allow_bundle_components", "is_allowed", "wider_entries"]

BUNDLE_ALLOW_LIST = tuple(sorted(APPROVED_CLASSES))


def is_allowed(class_path: str, allow_list=tuple(DEFAULT_CLASS_ALLOW_LIST) + BUNDLE_ALLOW_LIST) -> bool:
    """Whether a site with this bundle's policy builds ``class_path`` (FLARE's prefix rule)."""
    return any(
        class_path == entry or class_path.startswith(entry if entry.endswith(".") else entry + ".")
        for entry in allow_list
    )


def wider_entries(allow_list) -> list[str]:
    """Entries of a site's class allow list that admit more than named classes: package prefixes
    (FLARE builds any callable under them) and hospital_fl paths its jobs do not use."""
    return [
        entry
        for entry in allow_list
        if entry.endswith(".") or (entry.startswith("hospital_fl.") and entry not in BUNDLE_ALLOW_LIST)
    ]


def _admits_the_whole_bundle(entry: str) -> bool:
    # a package prefix over hospital_fl admits its functions too (the list before exact classes)
    return entry.endswith(".") and (entry.startswith("hospital_fl.") or "hospital_fl.".startswith(entry))


def allow_bundle_components(local_dir: str | Path, exact: bool = False) -> Path:
    """Add BUNDLE_ALLOW_LIST to the class allow list in ``local_dir``/resources.json.

    Keeps every other setting already in resources.json (or resources.json.default), and drops
    a package prefix over ``hospital_fl.``. With ``exact`` (kits the consortium provisions) the
    list becomes BUNDLE_ALLOW_LIST alone: the site builds nothing its jobs do not use.
    """
    local_dir = Path(local_dir)
    target = local_dir / "resources.json"
    source = target if target.exists() else local_dir / "resources.json.default"
    resources = json.loads(source.read_text()) if source.exists() else {"format_version": 2}
    # An explicit list (even an empty one) is the site's decision: extend it, never replace it.
    allowed = [] if exact else list(resources.get(CLASS_ALLOW_LIST, DEFAULT_CLASS_ALLOW_LIST))
    allowed = [entry for entry in allowed if not _admits_the_whole_bundle(entry)]
    allowed += [entry for entry in BUNDLE_ALLOW_LIST if entry not in allowed]
    resources[CLASS_ALLOW_LIST] = allowed
    local_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(resources, indent=2))
    return target
