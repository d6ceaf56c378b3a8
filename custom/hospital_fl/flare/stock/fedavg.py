"""Stock NVFlare FedAvgRecipe (ScriptRunner + Client API) on the same work, for timing."""

from __future__ import annotations

import json
import time
from pathlib import Path

from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

from hospital_fl.flare.runners.simulator import simulator_env
from hospital_fl.flare.stock import fedavg_client as stock_fedavg_client
from hospital_fl.jobspec import JobSpec, spec_to_json
from hospital_fl.models.cxr import CXRClassifier

__all__ = ["run_stock_fedavg"]


def run_stock_fedavg(spec: JobSpec, workspace_root: Path) -> float:
    """Wall seconds of the stock recipe running ``spec``'s training in SimEnv."""
    workspace_root = Path(workspace_root).resolve()
    name = "stock_fedavg"
    spec_file = workspace_root / f"{name}.spec.json"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec_to_json(spec)))
    env = simulator_env(workspace_root, name, spec.num_sites)
    recipe = FedAvgRecipe(
        name=name,
        model=CXRClassifier(spec.model.arch, spec.model.task, spec.model.image_size),
        min_clients=spec.num_sites,
        num_rounds=spec.num_rounds,
        train_script=stock_fedavg_client.__file__,
        # FLARE splits train_args on whitespace, so the spec travels as a file
        train_args=f"--spec-file {spec_file}",
    )
    start = time.perf_counter()
    recipe.run(env)
    return time.perf_counter() - start
