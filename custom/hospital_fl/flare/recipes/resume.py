"""A continuation job: the rest of a job whose server restarted, from its last saved round.

FLARE 2.9 does not resume a running job after a server restart (it no longer snapshots
jobs). What survives on the server's disk is enough to go on: the persistor's global model
after the last aggregated round, and the aggregator's round history. ``continuation_job``
edits the job folder that was submitted into one that starts there:

- the controller starts at ``start_round`` = the rounds completed and runs the rest, so at
  most the round that was running when the server died is trained again;
- the persistor loads the saved global model (a path on the server);
- the aggregator carries the earlier rounds into its round history and marks the first
  round it adds with where the job resumed, so the job's result states the restart;
- meta.json names the job ``<name>_resumed`` and records ``resumed_from``.

The sites' side is the same job (same executor arguments): each DP site plans its noise for
the job's announced rounds as before, and its ledger holds the rounds both jobs released, so
the privacy spend of the two together is what the original job would have spent, plus the
rounds trained again. What does not carry over is refused: SCAFFOLD's control variates,
central DP's accountant and HE's encrypted global model are not on the server's disk in a
form the continuation can load.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from hospital_fl.errors import InputError

__all__ = ["ResumePoint", "continuation_job", "RESUMED_FROM_KEY"]

RESUMED_FROM_KEY = "resumed_from"  # in meta.json and in the first resumed round's history entry
_RESUMABLE = ("RoundPolicyFedAvg", "RoundPolicyFedOpt")
_REFUSED = {
    "RoundPolicyScaffold": "SCAFFOLD's control variates (server and sites) were lost with the server process",
    "EncryptedFedAvg": "an HE job's global model is ciphertext the server cannot load into a persistor",
}


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted job stopped, as its server's run folder shows it.

    Attributes:
        job_id: the interrupted job.
        rounds_completed: rounds aggregated and saved; the continuation starts at this round.
        total_rounds: the rounds the job was submitted with.
        global_model: the persistor's saved global model, a path on the server.
        history: the aggregator's round_history.json of the interrupted job, a path on the server.
    """

    job_id: str
    rounds_completed: int
    total_rounds: int
    global_model: str
    history: str | None = None

    def __post_init__(self):
        if not (isinstance(self.rounds_completed, int) and 1 <= self.rounds_completed < self.total_rounds):
            raise InputError(
                "rounds completed",
                self.rounds_completed,
                f"a continuation needs at least one saved round and at least one left of {self.total_rounds}",
                "with 0 rounds resubmit the job itself; with all rounds done the job's model is final",
            )
        if not Path(self.global_model).is_absolute():
            raise InputError(
                "global model",
                self.global_model,
                "the server loads it, so it must be an absolute path on the server",
                "use <server workspace>/<job id>/app_server/FL_global_model.pt",
            )


def continuation_job(job_dir: str | Path, out_dir: str | Path, point: ResumePoint) -> Path:
    """Write the continuation of the job folder ``job_dir`` into ``out_dir``; returns its folder.

    Raises:
        InputError: ``job_dir`` is not a CXR job folder this can continue, or its rounds differ
            from ``point.total_rounds``.
    """
    job_dir = Path(job_dir)
    meta_file, server_file = job_dir / "meta.json", job_dir / "app" / "config" / "config_fed_server.json"
    if not (meta_file.is_file() and server_file.is_file()):
        raise InputError(
            "job folder",
            str(job_dir),
            "it must be the FLARE job folder that was submitted (meta.json and app/config/config_fed_server.json)",
            "pass the exported folder, e.g. jobs/cxr_fedavg_dp",
        )
    meta, server = json.loads(meta_file.read_text()), json.loads(server_file.read_text())
    workflow = server["workflows"][0]
    kind, args = workflow["path"].rsplit(".", 1)[-1], workflow["args"]
    if kind not in _RESUMABLE:
        raise InputError(
            "job folder",
            f"{job_dir} ({kind})",
            _REFUSED.get(kind, f"only {' and '.join(_RESUMABLE)} jobs continue"),
            "resubmit the job from round 0",
        )
    if args.get("num_rounds") != point.total_rounds:
        raise InputError(
            "job folder",
            f"{job_dir} (num_rounds {args.get('num_rounds')})",
            f"the interrupted job {point.job_id} ran {point.total_rounds} rounds; a continuation keeps the job's rounds",
            "pass the folder that was submitted",
        )
    aggregator = args.get("aggregator") or {}
    if (aggregator.get("args") or {}).get("central_dp"):
        raise InputError(
            "job folder",
            str(job_dir),
            "central DP's accountant was lost with the server process, so the continuation's noise could not be "
            "accounted with the rounds already released",
            "resubmit the job from round 0",
        )
    resumed = {"job_id": point.job_id, "rounds_completed": point.rounds_completed}
    args["start_round"] = point.rounds_completed
    args["num_rounds"] = point.total_rounds - point.rounds_completed  # FLARE's FedAvg: rounds to run from start_round
    if aggregator:
        aggregator.setdefault("args", {})[RESUMED_FROM_KEY] = {**resumed, "history": point.history}
    persistors = [c for c in server["components"] if c["path"].endswith(".PTFileModelPersistor")]
    if len(persistors) != 1:
        raise InputError("job folder", str(job_dir), "it must hold one PTFileModelPersistor", "export the job again")
    persistors[0]["args"]["source_ckpt_file_full_name"] = point.global_model

    name = f"{meta.get('name', job_dir.name)}_resumed"
    target = Path(out_dir) / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(job_dir, target)
    (target / "app" / "config" / "config_fed_server.json").write_text(json.dumps(server, indent=4) + "\n")
    (target / "meta.json").write_text(json.dumps({**meta, "name": name, RESUMED_FROM_KEY: resumed}, indent=4) + "\n")
    return target
