"""Client API training script for the stock NVFlare FedAvgRecipe (benchmark anchor only).

The benchmark runs the same site training as CXRTrainExecutor through FLARE's stock
path (FedAvgRecipe + ScriptRunner + Client API, script shipped in app/custom), so the two
ways of running the same work can be timed side by side.
"""

import argparse

import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel

from hospital_fl.data.federated import load_federated
from hospital_fl.data.splits import SplitConfig
from hospital_fl.models.cxr import ModelConfig
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.site_round import run_site_round


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-sites", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=0)
    args = parser.parse_args()
    train_cfg = TrainConfig(seed=args.seed, torch_threads=args.torch_threads)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    data = load_federated(SplitConfig(num_sites=args.num_sites, seed=args.seed))
    flare.init()
    site = data.site(flare.get_site_name())
    while flare.is_running():
        received = flare.receive()
        outcome = run_site_round(site, received.params, received.current_round or 0, received.total_rounds or 1,
                                 train_cfg, ModelConfig())
        # the stock PyTorch exchange carries torch tensors
        flare.send(FLModel(params={k: torch.as_tensor(v) for k, v in outcome.weights.items()}, metrics=outcome.metrics,
                           meta={"NUM_STEPS_CURRENT_ROUND": outcome.n_samples, "train_seconds": outcome.train_seconds}))


if __name__ == "__main__":
    main()
