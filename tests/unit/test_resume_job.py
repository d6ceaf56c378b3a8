"""The continuation of a job whose server restarted: the job folder edits, and what is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hospital_fl.errors import InputError
from hospital_fl.flare.recipes.resume import RESUMED_FROM_KEY, ResumePoint, continuation_job

JOBS = Path(__file__).resolve().parents[2] / "jobs"
MODEL = "/srv/fl/server/job-7/app_server/FL_global_model.pt"


def _server_config(folder: Path) -> dict:
    return json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())


def _point(done: int = 4, total: int = 10) -> ResumePoint:
    return ResumePoint("job-7", done, total, MODEL, "/srv/fl/server/job-7/round_history.json")


@pytest.mark.parametrize("job", ["cxr_fedavg", "cxr_fedavg_dp", "cxr_fedopt", "cxr_robust"])
def test_a_continuation_starts_at_the_first_unsaved_round_from_the_saved_model(tmp_path, job):
    original = _server_config(JOBS / job)
    total = original["workflows"][0]["args"]["num_rounds"]

    folder = continuation_job(JOBS / job, tmp_path, _point(4, total))

    server = _server_config(folder)
    controller = server["workflows"][0]["args"]
    assert controller["start_round"] == 4 and controller["num_rounds"] == total - 4
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"]["source_ckpt_file_full_name"] == MODEL
    assert controller["aggregator"]["args"][RESUMED_FROM_KEY] == {
        "job_id": "job-7",
        "rounds_completed": 4,
        "history": "/srv/fl/server/job-7/round_history.json",
    }
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["name"] == f"{job}_resumed" and meta[RESUMED_FROM_KEY] == {"job_id": "job-7", "rounds_completed": 4}
    # the sites run the same job: their config is untouched
    client = "app/config/config_fed_client.json"
    assert (folder / client).read_text() == (JOBS / job / client).read_text()
    assert _server_config(JOBS / job) == original  # the submitted folder is left as it was


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        ("cxr_scaffold", "SCAFFOLD's control variates"),
        ("cxr_fedavg_he", "global model is ciphertext"),
        ("seg_fedavg", "the interrupted job job-7 ran 10 rounds"),
    ],
)
def test_what_cannot_carry_over_is_refused_with_the_reason(tmp_path, job, reason):
    with pytest.raises(InputError, match=reason):
        continuation_job(JOBS / job, tmp_path, _point(4, 10))
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_central_dp_job_is_refused_its_accountant_was_lost(tmp_path):
    job = Path(shutil.copytree(JOBS / "cxr_fedavg", tmp_path / "central"))
    config = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(config.read_text())
    server["workflows"][0]["args"]["aggregator"]["args"]["central_dp"] = {"mechanism": "client-central"}
    config.write_text(json.dumps(server))
    with pytest.raises(InputError, match="central DP's accountant was lost"):
        continuation_job(job, tmp_path / "out", _point(4, 10))


@pytest.mark.parametrize(
    ("done", "total", "model", "rule"),
    [
        (0, 10, MODEL, "at least one saved round"),
        (10, 10, MODEL, "at least one left"),
        (4, 10, "app_server/FL_global_model.pt", "absolute path on the server"),
    ],
)
def test_a_resume_point_out_of_range_is_refused(done, total, model, rule):
    with pytest.raises(InputError, match=rule):
        ResumePoint("job-7", done, total, model)


def test_a_folder_that_is_not_a_job_is_named(tmp_path):
    with pytest.raises(InputError, match="the FLARE job folder that was submitted") as err:
        continuation_job(tmp_path, tmp_path / "out", _point())
    assert str(tmp_path) in str(err.value)


def _server_ctx(root: Path, job: str):
    from flare_messages import site_with_engine

    for folder in ("startup", "local", job):
        (root / folder).mkdir(parents=True, exist_ok=True)
    return site_with_engine(root, "server", job)


def _update(site: str, rnd: int):
    import numpy as np
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    return FLModel(
        params_type=ParamsType.DIFF,
        params={"w": np.full(3, 0.1, dtype=np.float32)},
        current_round=rnd,
        metrics={"train_loss": 0.5},
        meta={"client_name": site, "n_samples": 10},
    )


@pytest.mark.parametrize("readable", [True, False])
def test_the_continuations_history_carries_the_earlier_rounds_and_names_the_restart(tmp_path, readable):
    from hospital_fl.flare.aggregator import HISTORY_FILE, UpdateAggregator
    from nvflare.apis.event_type import EventType

    earlier = tmp_path / "job-7" / HISTORY_FILE
    earlier.parent.mkdir()
    rounds = [{"round": r, "sites": [{"site": "site-1", "accepted": True}]} for r in range(3)]  # round 2 unsaved
    earlier.write_text(json.dumps(rounds) if readable else "{trunc")
    resumed_from = {"job_id": "job-7", "rounds_completed": 2, "history": str(earlier)}
    aggregator = UpdateAggregator(resumed_from=resumed_from)
    ctx = _server_ctx(tmp_path / "server", "job-8")
    aggregator.handle_event(EventType.START_RUN, ctx)

    for rnd in (2, 3):
        for site in ("site-1", "site-2"):
            aggregator.accept_model(_update(site, rnd))
        aggregator.aggregate_model()

    saved = json.loads((tmp_path / "server" / "job-8" / HISTORY_FILE).read_text())
    restart = {"job_id": "job-7", "rounds_completed": 2}
    if readable:
        assert [e["round"] for e in saved] == [0, 1, 2, 3]
        assert [e.get("job_id") for e in saved] == ["job-7", "job-7", None, None]
    else:  # the earlier rounds are left out (logged); the restart is still stated
        assert [e["round"] for e in saved] == [2, 3]
    resumed = [e for e in saved if RESUMED_FROM_KEY in e]
    assert len(resumed) == 1 and resumed[0]["round"] == 2 and resumed[0][RESUMED_FROM_KEY] == restart


def test_a_continuation_controller_announces_the_jobs_rounds_to_the_sites():
    from hospital_fl.flare.controllers import RoundPolicyFedAvg
    from nvflare.app_common.abstract.fl_model import FLModel

    controller = RoundPolicyFedAvg(num_clients=2, num_rounds=6, start_round=4)
    model = FLModel(params={}, total_rounds=6)  # what FLARE's FedAvg sets: the rounds it runs
    controller._announce_job_rounds(model)
    assert model.total_rounds == 10
    fresh, model = RoundPolicyFedAvg(num_clients=2, num_rounds=6), FLModel(params={}, total_rounds=6)
    fresh._announce_job_rounds(model)
    assert model.total_rounds == 6


def test_resume_job_reads_the_servers_run_folder_and_writes_the_continuation(tmp_path, capsys):
    from hospital_fl.cli import main

    run_dir = tmp_path / "server" / "job-7"
    (run_dir / "app_server" / "config").mkdir(parents=True)
    shutil.copy(JOBS / "cxr_fedavg_dp" / "app" / "config" / "config_fed_server.json", run_dir / "app_server" / "config")
    (run_dir / "app_server" / "FL_global_model.pt").write_bytes(b"saved")
    (run_dir / "round_history.json").write_text(json.dumps([{"round": r, "sites": []} for r in range(3)]))

    code = main(["resume-job", str(JOBS / "cxr_fedavg_dp"), "--server-run-dir", str(run_dir), "--out", str(tmp_path)])

    assert code == 0
    folder = tmp_path / "cxr_fedavg_dp_resumed"
    controller = _server_config(folder)["workflows"][0]["args"]
    assert controller["start_round"] == 3
    assert (
        f"rounds 3..{controller['start_round'] + controller['num_rounds'] - 1} of job job-7" in capsys.readouterr().out
    )
    persistor = next(c for c in _server_config(folder)["components"] if c["id"] == "persistor")
    assert persistor["args"]["source_ckpt_file_full_name"] == str(run_dir / "app_server" / "FL_global_model.pt")


def test_resume_job_without_a_saved_round_says_to_resubmit(tmp_path, capsys):
    from hospital_fl.cli import main

    run_dir = tmp_path / "server" / "job-7"
    (run_dir / "app_server").mkdir(parents=True)

    code = main(["resume-job", str(JOBS / "cxr_fedavg"), "--server-run-dir", str(run_dir), "--out", str(tmp_path)])

    assert code != 0
    err = capsys.readouterr().err
    assert "job-7" in err and "resubmit the job from round 0" in err
