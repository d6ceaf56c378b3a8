"""Cross-site evaluation at a hospital: FLARE's CrossSiteModelEval tasks on the site algorithm.

FLARE's CrossSiteModelEval (server) first asks every site for its local model
("submit_model"), then sends each model it has (the server's global model(s) and every
site's local model) to every site ("validate"). Here a site

- keeps its last local model after each training round, in its state folder (it outlives
  the job, so a later cross-site job can ask for it): the global model it received plus the
  update it sent, i.e. what the server already saw. A site whose update left it only
  encrypted (an HE job) keeps a note instead: sending that model in plaintext would show the
  server the one update HE hides;
- answers "submit_model" with that model, or refuses with the reason;
- answers "validate" by scoring the model on its own local test portion only and sending one
  cell: AUC, bootstrap 95% CI, test count and its own name (evaluation.clinical.cross_site
  .site_cell). No image, label or per-image score leaves it. Under DP the site keeps its
  scores, as in training.

On the server FLARE's ValidationJsonGenerator writes every cell under the name of the
client that sent it, as FLARE authenticated it (``read_cross_site_results``);
``cross_site_matrix`` checks each cell names its sender's own data before any cell counts.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.fl_constant import JobConstants
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from hospital_fl.data.ingest.site_dataset import site_state_dir
from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical.cross_site import CrossSiteMatrix, complete_models, matrix_from_cells, site_cell
from hospital_fl.flare.job_type_gate import read_app_config
from hospital_fl.flare.privacy_gate import refusal_reply
from hospital_fl.models.cxr import build_cxr_model
from hospital_fl.training.loops import predict_proba, set_weights
from hospital_fl.training.site_algorithm import SiteAlgorithm, SiteLog

__all__ = [
    "CROSS_VAL_RESULTS_FILE",
    "LOCAL_MODEL_DIR",
    "SUBMIT_MODEL_TASK",
    "cross_site_matrix",
    "cross_site_seconds",
    "is_cross_site_validation",
    "keep_local_model",
    "local_model_paths",
    "model_label",
    "read_cross_site_results",
    "score_for_cross_site",
    "submit_local_model",
]

SUBMIT_MODEL_TASK = AppConstants.TASK_SUBMIT_MODEL  # "submit_model"
CROSS_VAL_RESULTS_FILE = "cross_val_results.json"  # FLARE's ValidationJsonGenerator default
LOCAL_MODEL_DIR = "cross_site"  # under the site's state folder (data.ingest.site_dataset.site_state_dir)
SERVER_MODEL_PREFIX = "SRV_"  # CrossSiteModelEval's name for a model its locator found
ENCRYPTING_FILTER = "hospital_fl.flare.he.EncryptUpdate"


def local_model_paths(state_dir: str | Path, kind: str) -> tuple[Path, Path]:
    """(weights, record) files of the last local model of job kind ``kind`` in a site's state folder."""
    slug = re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "model"
    folder = Path(state_dir) / LOCAL_MODEL_DIR
    return folder / f"{slug}_last_local_model.pt", folder / f"{slug}_last_local_model.json"


def _site_state(fl_ctx: FLContext) -> Path | None:
    engine = fl_ctx.get_engine()
    workspace = engine.get_workspace() if engine is not None else None
    return site_state_dir(workspace.get_root_dir(), fl_ctx.get_identity_name()) if workspace is not None else None


def _uplink_encrypted(fl_ctx: FLContext) -> bool | None:
    """Whether this job encrypts what the site sends (its client config names EncryptUpdate);
    None when the config cannot be read."""
    workspace, job_id = fl_ctx.get_engine().get_workspace(), fl_ctx.get_job_id()
    try:
        config, _ = read_app_config(workspace.get_app_dir(job_id), JobConstants.CLIENT_JOB_CONFIG)
    except (OSError, ValueError):
        return None
    if config is None:
        return None
    return any(
        f.get("path") == ENCRYPTING_FILTER
        for group in config.get("task_result_filters") or []
        for f in group.get("filters") or []
    )


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def keep_local_model(
    received: Mapping[str, np.ndarray],
    sent: Mapping[str, np.ndarray],
    params_type: str,
    round_index: int,
    kind: str,
    fl_ctx: FLContext,
    log: SiteLog,
) -> Path | None:
    """Keep this round's local model (received + sent difference, or the full weights sent)
    as the site's last local model of ``kind``; returns the record's path (None without a workspace).

    In a job that encrypts the site's updates, or one whose config cannot be read, only a
    record saying why is kept (and any older model of ``kind`` removed): the next
    "submit_model" is refused rather than showing the server that update.
    """
    state = _site_state(fl_ctx)
    if state is None:  # a bare harness context: no workspace to keep it in
        return None
    weights_path, record_path = local_model_paths(state, kind)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    encrypted = _uplink_encrypted(fl_ctx)
    withheld = None
    if encrypted is None:
        withheld = (
            "this job's client config could not be read, so whether its updates left the site encrypted is unknown"
        )
    elif encrypted:
        withheld = (
            "the job encrypted this site's updates (HE): its local model in plaintext would show the server the "
            "update HE hides"
        )
    record = {
        "site": fl_ctx.get_identity_name(),
        "job_id": fl_ctx.get_job_id(),
        "round": int(round_index),
        "kind": kind,
        "saved_unix": time.time(),
        "withheld": withheld,
    }
    if withheld:
        weights_path.unlink(missing_ok=True)
    else:
        if params_type == ParamsType.DIFF.value:
            local = {k: np.asarray(received[k]) + np.asarray(sent[k]) if k in sent else received[k] for k in received}
        else:
            local = dict(sent)
        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in local.items()}
        _write_atomically(weights_path, lambda p: torch.save(tensors, p))
    _write_atomically(record_path, lambda p: p.write_text(json.dumps(record, indent=1)))
    if withheld:
        log.info(f"cross-site: local model of round {round_index} not kept for submission: {withheld}")
    return record_path


def submit_local_model(kind: str, fl_ctx: FLContext, log: SiteLog) -> Shareable:
    """The "submit_model" answer: the site's last local model of ``kind``, or a refusal saying why."""
    state = _site_state(fl_ctx)
    site = fl_ctx.get_identity_name()
    if state is None:
        return _refuse(log, f"cross-site: {site} has no workspace to keep a local model in")
    weights_path, record_path = local_model_paths(state, kind)
    if not record_path.is_file():
        return _refuse(
            log,
            f"cross-site: {site} keeps no local model of a {kind} job in {record_path.parent}; run a training job at "
            "this site first (each training round keeps the site's last local model there)",
        )
    record = json.loads(record_path.read_text())
    if record.get("withheld"):
        return _refuse(log, f"cross-site: {site} does not submit its local model: {record['withheld']}")
    weights = {k: v.numpy() for k, v in torch.load(weights_path, map_location="cpu", weights_only=True).items()}
    log.info(f"cross-site: submitting the local model of job {record['job_id']}, round {record['round']}")
    return FLModelUtils.to_shareable(
        FLModel(
            params_type=ParamsType.FULL,
            params=weights,
            meta={"trained_in_job": record["job_id"], "round": record["round"]},
        )
    )


def is_cross_site_validation(task: Shareable) -> bool:
    """A "validate" task from CrossSiteModelEval: it names the model's owner (an HE job's
    final-model "validate" does not)."""
    return bool(task.get_header(AppConstants.MODEL_OWNER))


def score_for_cross_site(algorithm: SiteAlgorithm, weights: Mapping, fl_ctx: FLContext, log: SiteLog) -> Shareable:
    """The "validate" answer: the model's cell on this site's own local test portion, or a refusal.

    The algorithm must hold its loaded data as ``data`` (a SiteData, with ``test``) and its
    network as ``model_cfg``, as the chest X-ray site algorithm does.
    """
    site = fl_ctx.get_identity_name()
    if algorithm.release_plan() is not None:
        return _refuse(log, f"cross-site: under DP {site} keeps its scores at the site")
    test = getattr(getattr(algorithm, "data", None), "test", None)
    model_cfg = getattr(algorithm, "model_cfg", None)
    if test is None or model_cfg is None:
        return _refuse(
            log,
            f"cross-site: {site} scores classifiers on its local test portion; the {algorithm.job} job has none",
        )
    model = build_cxr_model(model_cfg)
    try:
        set_weights(model, dict(weights))
    except (KeyError, RuntimeError) as err:
        return _refuse(log, f"cross-site: {site} cannot load the model to score ({err}); it is not this job's network")
    device = getattr(getattr(algorithm, "train_cfg", None), "device", "cpu")
    cell = site_cell(site, test.labels, predict_proba(model, test.images, device))
    owner = fl_ctx.get_prop(AppConstants.MODEL_OWNER) or "model"
    log.info(f"cross-site: {owner} on {site}'s {cell.n_test} test images: AUC {cell.auc.estimate:.4f}")
    return FLModelUtils.to_shareable(FLModel(metrics=cell.to_metrics()))


def _refuse(log: SiteLog, reason: str) -> Shareable:
    log.warning(reason)
    return refusal_reply(reason)


# ---------------------------------------------------------------- server side: the results


def read_cross_site_results(result_dir: str | Path) -> dict[str, dict[str, dict]]:
    """{sending site: {model owner: cell metrics}} as FLARE's ValidationJsonGenerator wrote it in a
    server job result ("SRV_<file>" for the server's models, the site's name for its local model).

    Raises:
        RuntimeError: the result holds no cross-site results (the job did not reach its end).
    """
    found = sorted(Path(result_dir).rglob(CROSS_VAL_RESULTS_FILE))
    if not found:
        raise RuntimeError(
            f"{result_dir} holds no {CROSS_VAL_RESULTS_FILE}: the cross-site evaluation did not finish; "
            "read the server log there"
        )
    return json.loads(found[0].read_text())


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_CSE_START = "Beginning model validation"
_CSE_WORKFLOW = "wf=cross_site_eval"


def cross_site_seconds(result_dir: str | Path) -> float | None:
    """Seconds the cross-site evaluation took on the server: from CrossSiteModelEval's start to
    the last line its workflow logged (the job's end), read from the server log in a job
    result; None when the log holds no cross-site evaluation."""
    for log in sorted(Path(result_dir).rglob("log.txt")):
        times = []
        for line in log.read_text(errors="replace").splitlines():
            stamp = _LOG_TIME.match(line)
            if stamp and (times or _CSE_START in line) and _CSE_WORKFLOW in line:
                times.append(datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f"))
        if times:
            return (times[-1] - times[0]).total_seconds()
    return None


def model_label(owner: str) -> str:
    """The report's name of a model owner: "global" (the job's final model, or the one file a
    cross-site job was given), "global (best round)" (the best validation round's), "<site> local"."""
    if not owner.startswith(SERVER_MODEL_PREFIX):
        return f"{owner} local"
    name = owner[len(SERVER_MODEL_PREFIX) :]
    return "global (best round)" if name.startswith("best_") else "global"


def cross_site_matrix(
    results: Mapping[str, Mapping[str, Mapping]], sites: tuple[str, ...] | list[str]
) -> tuple[CrossSiteMatrix, dict[str, list[str]]]:
    """The matrix of every model that every site scored, and {model: sites without a cell} for the rest.

    Rows: the global model(s), then each site's local model in site order.

    Raises:
        InputError: a sender that is not one of ``sites``, a cell naming another site's data,
            or two server models with the same report name.
    """
    owners: list[str] = []
    for by_owner in results.values():
        owners += [o for o in by_owner if o not in owners]
    labels = {o: model_label(o) for o in owners}
    if len(set(labels.values())) != len(labels):
        raise InputError(
            "server models",
            sorted(owners),
            "each model must get its own row (one final global model, at most one best-round model)",
            "give the cross-site job one global model file",
        )
    relabelled = {s: {labels[o]: cell for o, cell in by_owner.items()} for s, by_owner in results.items()}
    unknown = sorted(set(relabelled) - set(sites))
    if unknown:
        raise InputError(
            "cross-site senders", unknown, f"only the hospitals {list(sites)} score models", "drop those results"
        )
    present, missing = complete_models(relabelled, sites)
    order = {"global": 0, "global (best round)": 1, **{f"{s} local": 2 + i for i, s in enumerate(sites)}}
    rows = tuple(sorted(present, key=lambda m: order.get(m, len(order))))
    return matrix_from_cells(relabelled, sites=sites, models=rows), missing
