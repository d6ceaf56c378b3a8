"""Live metrics in FLARE's simulator: each site's per-round scalars reach the server's
TensorBoard receiver while the job runs, one event folder per site."""

from pathlib import Path

import pytest
from hospital_fl.data.splits import SplitConfig
from hospital_fl.flare.recipes.cxr import TB_FOLDER
from hospital_fl.flare.runners.simulator import run_in_simulator
from hospital_fl.jobspec import JobSpec
from hospital_fl.training.config import TrainConfig
from small_cxr import write_small_cxr
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.integration


def read_scalars(site_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of a site's TensorBoard event files."""
    events = EventAccumulator(str(site_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_each_site_streams_what_its_reply_carries_per_round(tmp_path):
    data = write_small_cxr(tmp_path / "small.npz")
    spec = JobSpec(
        num_rounds=2, split=SplitConfig(num_sites=2), train=TrainConfig(torch_threads=1), data_path=str(data)
    )

    run = run_in_simulator(spec, tmp_path / "ws")

    (tb_root,) = run.result_dir.rglob(TB_FOLDER)
    assert sorted(p.name for p in tb_root.iterdir()) == ["site-1", "site-2"]
    for site in ("site-1", "site-2"):
        scalars = read_scalars(tb_root / site)
        assert set(scalars) == {"val_auc", "test_auc", "train_loss", "train_seconds"}
        for entry in run.history:  # the streamed value of each round is the one the server aggregated
            sent = next(s for s in entry["sites"] if s["site"] == site)
            for tag, value in {**sent["metrics"], "train_seconds": sent["train_seconds"]}.items():
                assert (entry["round"], pytest.approx(value, rel=1e-6)) in scalars[tag], (site, tag)
        assert all([step for step, _ in points] == [0, 1] for points in scalars.values())
