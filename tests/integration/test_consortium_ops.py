"""A consortium that runs for weeks, on a real POC system (server and 3 hospitals as processes):
a hospital dies mid-job and the job finishes under its round policy; the hospital is started
again from its kit and joins the next job (FLARE 2.9 never hands it the running one); the
server dies mid-job and `wait_for_job` says clearly that FLARE cannot resume the job.

The POC server's dead-client detection is shortened (Liveness: 15 s heartbeat timeout, 2 s
grace) so the drop-out plays out within the job; production kits keep FLARE's defaults.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hospital_fl.audit import read_trail
from hospital_fl.bench.provision import free_ports
from hospital_fl.data.pneumoniamnist import load_pneumoniamnist
from hospital_fl.data.splits import SplitConfig
from hospital_fl.flare.aggregator import HISTORY_FILE
from hospital_fl.flare.recipes.cxr import export_job
from hospital_fl.flare.recipes.resume import RESUMED_FROM_KEY, continuation_job
from hospital_fl.flare.runners.poc import (
    Liveness,
    LiveSystem,
    PocSystem,
    ServerRestartedError,
    connected_clients,
    poc_processes,
    prepare_system,
    run_job,
    running_system,
    submit_folder,
    wait_for_job,
)
from hospital_fl.flare.runners.simulator import GLOBAL_MODEL_FILE
from hospital_fl.jobspec import JobSpec
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.ledger import SPEND_EVENT, PrivacyLedger
from hospital_fl.training.config import TrainConfig
from nvflare.fuel.flare_api.flare_api import new_secure_session

pytestmark = pytest.mark.integration

SITES = ("site-1", "site-2", "site-3")
DROPPED = "site-3"
PER_CLASS = 120  # images per class in the small copy of the embedded data (3 sites need >= 54)


@pytest.fixture(scope="module")
def small_cxr(tmp_path_factory) -> Path:
    """A MedMNIST-layout copy of the embedded chest X-rays with PER_CLASS images per class, so
    a DP round takes a few seconds at each hospital."""
    full, picked = load_pneumoniamnist(), {}
    for portion in ("train", "val", "test"):
        arrays, n = full[portion], PER_CLASS if portion == "train" else PER_CLASS // 4
        rows = np.concatenate([np.flatnonzero(arrays.labels.reshape(-1) == c)[:n] for c in (0, 1)])
        picked[f"{portion}_images"], picked[f"{portion}_labels"] = arrays.images[rows], arrays.labels[rows]
    path = tmp_path_factory.mktemp("data") / "small_cxr.npz"
    np.savez(path, **picked)
    return path


@dataclass
class Consortium:
    root: Path
    system: PocSystem
    live: LiveSystem
    stop: Callable[[], None]  # stops the system (again: a no-op)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """One running POC system for the module's tests, in order; the last one stops it."""
    root = tmp_path_factory.mktemp("consortium_ops")
    system = prepare_system(root, len(SITES), free_ports(1)[0], privacy=True, liveness=Liveness(15, 2))
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(running_system(system))
        yield Consortium(root, system, live, stack.close)
    assert not poc_processes(system.workspace)


def _spec(small_cxr: Path, name: str, rounds: int, **changes) -> JobSpec:
    return JobSpec(
        name=name,
        num_rounds=rounds,
        split=SplitConfig(num_sites=len(SITES)),
        data_path=str(small_cxr),
        train=TrainConfig(torch_threads=1, batch_size=32),
        **changes,
    )


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", re.M)


def _first_time(log: Path, text: str) -> float | None:
    """Epoch seconds of the first line of ``log`` containing ``text`` (FLARE logs local time)."""
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        stamp = _STAMP.match(line)
        if stamp and text in line:
            return dt.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f}s")
        time.sleep(0.5)
    return value


def _spends(kit: Path) -> list[dict]:
    """The privacy spends in a site's audit trail, one per DP training round it recorded."""
    return [r.details for r in read_trail(kit / "privacy" / "audit.jsonl") if r.event == SPEND_EVENT]


def test_a_hospital_dies_mid_job_the_job_finishes_and_its_restart_gets_no_part_of_it(consortium, small_cxr):
    root, system, live = consortium.root, consortium.system, consortium.live
    spec = _spec(small_cxr, "cxr_dropout", 5, min_clients=2, wait_after_min=6, privacy=DPConfig("sample", 8.0))
    job = export_job(spec, root / "jobs")
    assert json.loads((job / "meta.json").read_text())["min_clients"] == 2  # FLARE's abort rule follows the policy

    seen: dict = {}
    killed = threading.Event()

    def kill_in_round_2(done: int) -> None:  # RoundWatcher: `done` rounds finished, round index `done` runs
        if done >= 1 and not killed.is_set():
            seen["killed_at"], seen["running_round"] = time.time(), done
            seen["killed_pids"] = live.kill(DROPPED)
            killed.set()

    def restart_once_removed() -> None:
        """The hospital's operator starts it again once the server has removed it, and looks
        at what the server knows while the job still runs (its own admin session)."""
        try:
            killed.wait(120)
            removal = f"Remove the dead Client. Name: {DROPPED}"
            _wait_for(lambda: _first_time(system.server_log, removal), 60, "removal")
            seen["restarted_at"] = time.time()
            live.start_from_kit(DROPPED)
            session = new_secure_session(system.admin, str(system.kit(system.admin)), timeout=10.0)
            try:
                _wait_for(lambda: DROPPED in connected_clients(session), 60, f"{DROPPED} registering again")
                seen["registered_at"] = time.time()
                seen["job_status_by_site"] = {s["client_name"]: s for s in session.get_client_job_status()}
            finally:
                session.close()
        except Exception as err:  # reported by the assertions below
            seen["rejoin_error"] = repr(err)

    operator = threading.Thread(target=restart_once_removed, daemon=True)
    operator.start()
    run = run_job(live, job, root / "result", timeout_s=240, on_round=kill_in_round_2)
    operator.join(60)

    # The round history: who contributed to which round.
    joined = {site: [e["round"] for e in run.history if site in {s["site"] for s in e["sites"]}] for site in SITES}
    assert [e["round"] for e in run.history] == [0, 1, 2, 3, 4]
    assert joined["site-1"] == joined["site-2"] == [0, 1, 2, 3, 4]
    # It took part until it died: round 0, and the running round too where its update had left
    # before the kill (the round watcher polls, so on a loaded machine it sometimes had); never after.
    assert (
        joined[DROPPED] == list(range(len(joined[DROPPED]))) and 0 < len(joined[DROPPED]) <= seen["running_round"] + 1
    )
    assert all(s["accepted"] for e in run.history for s in e["sites"])

    # FLARE declared the hospital dead during the job, and min_clients=2 kept the job alive.
    job_log = next(run.result_dir.rglob("log.txt"))
    deemed_dead = _first_time(job_log, f"Client {DROPPED} is deemed disconnected")
    left = _first_time(system.server_log, f"Client Name:{DROPPED} left")
    assert left is not None and deemed_dead is not None
    assert "deployment policy violation" not in job_log.read_text()

    # Its privacy ledger: one recorded spend per round it started training (recorded before the
    # update left), none after it died; the live hospitals recorded every round.
    assert len(_spends(system.kit("site-1"))) == len(_spends(system.kit("site-2"))) == 5
    dropped_spends = _spends(system.kit(DROPPED))
    # each round it sent, and the running round if it died after recording its spend
    assert len(joined[DROPPED]) <= len(dropped_spends) <= seen["running_round"] + 1
    ledger = PrivacyLedger(system.kit(DROPPED) / "privacy" / "ledger.json")
    recorded = {e.mechanism: e.steps for e in ledger.entries()}
    released: dict[str, int] = {}
    for spend in dropped_spends:
        for release in spend["releases"]:
            released[release["mechanism"]] = released.get(release["mechanism"], 0) + release["steps"]
    assert set(recorded) == {"sample", "metrics"} and recorded == released

    # Restarted from its kit, it registered while the job ran, but FLARE never gave it the job.
    assert "rejoin_error" not in seen, seen.get("rejoin_error")
    status = seen["job_status_by_site"]
    assert status[DROPPED]["status"] == "no_jobs"
    assert status["site-1"].get("job_id") and status["site-1"]["status"] != "no_jobs"

    print(
        "\nDROPOUT_FIGURES "
        + json.dumps(
            {
                "job_wall_s": round(run.wall_seconds, 1),
                "kill_to_removed_s": round(left - seen["killed_at"], 1),
                "kill_to_deemed_disconnected_s": round(deemed_dead - seen["killed_at"], 1),
                "start_sh_to_registered_s": round(seen["registered_at"] - seen["restarted_at"], 1),
                "dropped_site_spends": len(dropped_spends),
            }
        )
    )


def test_the_hospital_joins_the_next_job_and_after_a_server_restart_its_continuation_finishes(consortium, small_cxr):
    root, system, live = consortium.root, consortium.system, consortium.live
    if DROPPED not in connected_clients(live.session):  # the previous test restarts it; alone, do it here
        live.start_from_kit(DROPPED)
    live.wait_connected(SITES, 60)
    job_dir = export_job(_spec(small_cxr, "cxr_next", 3, wait_after_min=0), root / "jobs")
    job_id = submit_folder(live.session, job_dir)
    run_dir = system.kit(system.server) / job_id
    seen: dict = {}

    def kill_and_restart_server() -> None:
        """The server dies after the first saved round; its operator starts it again from its kit."""
        saved = [run_dir / "app_server" / GLOBAL_MODEL_FILE, run_dir / HISTORY_FILE]
        _wait_for(lambda: all(p.exists() for p in saved), 120, "a saved round")
        seen["history"] = json.loads((run_dir / HISTORY_FILE).read_text())
        seen["killed_at"] = time.monotonic()
        seen["killed_pids"] = live.kill(system.server)
        live.start_from_kit(system.server)

    operator = threading.Thread(target=kill_and_restart_server, daemon=True)
    operator.start()
    with pytest.raises(ServerRestartedError) as err:
        wait_for_job(live, job_id, timeout_s=180)
    seen["detected_s"] = time.monotonic() - seen["killed_at"]
    operator.join(60)

    # The operator submits the continuation to the restarted server: it starts at the first
    # round not saved, from the saved global model, and finishes the job's rounds.
    started_before_kill = len(re.findall(r"Round \d+ started", (run_dir / "log.txt").read_text(errors="replace")))
    point = err.value.job.resume_point()
    live.reconnect(90)
    resumed = run_job(live, continuation_job(job_dir, root / "jobs_resumed", point), root / "resumed", timeout_s=180)
    stopping = time.monotonic()
    consortium.stop()
    seen["stop_s"] = time.monotonic() - stopping
    assert not poc_processes(system.workspace)  # the server started again from its kit included

    # The restarted hospital trained in the next job.
    assert sorted(s["site"] for s in seen["history"][0]["sites"]) == list(SITES)

    message, job = str(err.value), err.value.job
    assert message.startswith(f"job {job_id} (cxr_next) cannot finish: the FLARE server process that ran it")
    assert "FLARE 2.9 does not resume a job after a server restart" in message
    assert job.rounds_completed is not None and 1 <= job.rounds_completed < 3
    assert f"Rounds completed: {job.rounds_completed} of 3" in message
    assert job.global_model == run_dir / "app_server" / GLOBAL_MODEL_FILE
    assert (
        f"Fix: submit its continuation, which starts at round {job.rounds_completed} (`hospital-fl resume-job`)"
        in message
    )
    assert (
        f"the persistor's last global model (after round {job.rounds_completed - 1}) is {job.global_model}" in message
    )
    # The continuation: the earlier rounds from the interrupted job, then the rest, the first
    # of which names the restart; at most the round running at the kill was trained again.
    assert [e["round"] for e in resumed.history] == [0, 1, 2]
    done = point.rounds_completed
    assert all(e["job_id"] == job_id for e in resumed.history[:done])
    assert resumed.history[done][RESUMED_FROM_KEY] == {"job_id": job_id, "rounds_completed": done}
    assert all(sorted(s["site"] for s in e["sites"]) == list(SITES) for e in resumed.history[done:])
    assert started_before_kill - done <= 1
    print(
        f"\nRESUME_FIGURES rounds completed {done} of 3, rounds started before the kill {started_before_kill}, "
        f"continuation wall {resumed.wall_seconds:.1f}s"
    )
    print(
        f"\nRESTART_MESSAGE {message}\nRESTART_FIGURES detected {seen['detected_s']:.1f}s after the kill, stopped in {seen['stop_s']:.1f}s"
    )
