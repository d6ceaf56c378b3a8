"""Client API training script for the stock NVFlare FedAvgRecipe (benchmark anchor only).

The benchmark runs the same site training as CXRTrainExecutor through FLARE's stock
path (FedAvgRecipe + ScriptRunner + Client API, script shipped in app/custom), so the two
ways of running the same work can be timed side by side.
"""

import argparse
import json
from pathlib import Path

import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel

from hospital_fl.data.federated import load_federated
from hospital_fl.jobspec import JobSpec
from hospital_fl.training.site_round import run_site_round


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec-file", required=True, help="the JobSpec as a JSON file")
    spec = JobSpec.from_json(json.loads(Path(parser.parse_args().spec_file).read_text()))
    if spec.train.torch_threads:
        torch.set_num_threads(spec.train.torch_threads)
    data = load_federated(spec.split, spec.data_path)
    flare.init()
    site = data.site(flare.get_site_name())
    while flare.is_running():
        received = flare.receive()
        mu = float((received.meta or {}).get("fedprox_mu") or 0.0)
        outcome = run_site_round(
            site,
            received.params,
            received.current_round or 0,
            received.total_rounds or 1,
            spec.train,
            spec.model,
            fedprox_mu=mu,
        )
        # the stock PyTorch exchange carries torch tensors
        flare.send(
            FLModel(
                params={k: torch.as_tensor(v) for k, v in outcome.weights.items()},
                metrics=outcome.metrics,
                meta={"NUM_STEPS_CURRENT_ROUND": outcome.n_samples, "train_seconds": outcome.train_seconds},
            )
        )


if __name__ == "__main__":
    main()
