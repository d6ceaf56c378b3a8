"""A site operator mounts the data read-only (the documented Docker layout): jobs still train.

The site dataset folder is made read-only (chmod -R a-w) and, because tests may run as root
(where chmod stops nothing), every FLARE process of the run gets an audit hook that refuses,
and logs, any write, rename, removal or folder creation under it. A real FLARE simulator job
then trains from it through the real executor; nothing may have been attempted there, the
folder's files and times must be unchanged, and the job's usage record must be in the site's
writable state folder. A state folder that cannot be written is a refusal with the reason.
"""

import hashlib
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from dicom_factory import ingest_export, upscale, write_cxr
from hospital_fl.data.ingest.manifest import read_usage
from hospital_fl.data.ingest.site_dataset import SITE_STATE_ENV

PATIENTS = 12
GUARD = textwrap.dedent(
    """
    # Loaded as sitecustomize by every process of the run: writes under the guarded folder fail.
    import os, sys

    _root = os.environ.get("HOSPITAL_FL_TEST_READONLY")
    _log = os.environ.get("HOSPITAL_FL_TEST_READONLY_LOG")
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _PATH_EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                    "os.chmod", "os.chown", "os.utime", "shutil.rmtree", "shutil.copyfile")

    def _under(p):
        if not isinstance(p, (str, bytes, os.PathLike)):
            return False
        try:
            p = os.path.realpath(os.fsdecode(p))
        except OSError:  # a name relative to a folder that is gone (rmtree's dir_fd walk): not ours
            return False
        return p == _root or p.startswith(_root + os.sep)

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            bad = _under(path) and (bool(mode) and any(c in mode for c in "wax+") or bool((flags or 0) & _WRITE))
        elif event in _PATH_EVENTS:
            bad = any(_under(a) for a in args[:2])
        else:
            return
        if bad:
            with open(_log, "a") as f:
                f.write(f"{os.getpid()} {event} {args[0]!r}\\n")
            raise PermissionError(30, "Read-only file system", os.fsdecode(args[0]))

    if _root and _log:
        sys.addaudithook(_hook)
    """
)


def _tree(folder) -> dict:
    """Every entry under ``folder``: kind, mode, size, mtime and content hash."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            digest = hashlib.sha256(open(p, "rb").read()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, folder)] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture
def readonly_site(tmp_path, federated_data, monkeypatch):
    data = tmp_path / "data"
    source = federated_data.sites[1].train  # about half pneumonia
    by_label = [np.flatnonzero(source.labels == c) for c in (0, 1)]
    for offset, site in enumerate(("site-1", "site-2")):
        export = tmp_path / f"{site}-pacs"
        rows, consent = [], []
        # each patient has one normal and one pneumonia image, so every patient-level portion
        # (train, validation, local test) holds both classes and its AUC is defined
        for p in range(PATIENTS):
            for label in (0, 1):
                i = by_label[label][offset * PATIENTS + p]
                name = f"p{p:02d}_{label}.dcm"
                write_cxr(export / name, upscale(source.images[i], 256), patient_id=f"{site}-P{p:02d}")
                rows.append(f"{name},{label}")
            consent.append(f"{site}-P{p:02d},granted,2026-01-01")
        ingest_export(export, rows, consent, tmp_path, site, data / site)
    subprocess.run(["chmod", "-R", "a-w", str(data)], check=True)
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "writes_attempted.log"
    log.touch()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HOSPITAL_FL_TEST_READONLY", os.path.realpath(data))
    monkeypatch.setenv("HOSPITAL_FL_TEST_READONLY_LOG", str(log))
    yield data, log
    subprocess.run(["chmod", "-R", "u+w", str(data)], check=True)  # let pytest clean up


def test_the_guard_refuses_writes_under_the_data_folder(readonly_site):
    """Without this, a passing run below would prove nothing when tests run as root."""
    data, log = readonly_site
    target = data / "site-1" / "usage" / "x.json"
    probe = f"import pathlib; pathlib.Path({str(target)!r}).parent.mkdir(); pathlib.Path({str(target)!r}).write_text('x')"

    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)

    assert proc.returncode != 0 and "Read-only file system" in proc.stderr
    assert "os.mkdir" in log.read_text() and not target.parent.exists()


def test_a_site_dataset_on_a_read_only_folder_trains_through_the_real_executor(readonly_site, tmp_path, monkeypatch):
    from hospital_fl.data.splits import SplitConfig
    from hospital_fl.flare.runners.simulator import run_in_simulator
    from hospital_fl.jobspec import JobSpec
    from hospital_fl.training.config import TrainConfig

    data, log = readonly_site
    state = tmp_path / "state"
    monkeypatch.setenv(SITE_STATE_ENV, str(state))
    before = _tree(data)
    spec = JobSpec(
        name="cxr_readonly",
        num_rounds=1,
        split=SplitConfig(num_sites=2),
        train=TrainConfig(epochs=1, torch_threads=1),
        site_data=str(data / "{site}"),
        wait_after_min=0,
    )

    run = run_in_simulator(spec, tmp_path / "ws")

    assert sorted(s["site"] for s in run.history[-1]["sites"]) == ["site-1", "site-2"]
    assert log.read_text() == ""  # no write was even attempted under the data folder
    assert _tree(data) == before
    for site in ("site-1", "site-2"):
        (usage,) = read_usage(state / site)
        assert usage["job_id"] and len(usage["patients"]) == PATIENTS


def test_an_unwritable_state_folder_is_a_refusal_with_the_reason(readonly_site, tmp_path, monkeypatch):
    """Any failure preparing the data refuses the job (every task answered with an error and the
    reason in the site's log), instead of an exception escaping the executor."""
    from hospital_fl.flare.executor import CXRTrainExecutor
    from nvflare.apis.fl_constant import ReservedKey, ReturnCode
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.shareable import Shareable
    from nvflare.apis.signal import Signal

    data, _ = readonly_site
    blocker = tmp_path / "state-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv(SITE_STATE_ENV, str(blocker))  # <file>/site-1/usage cannot be created, even as root
    executor = CXRTrainExecutor(site_data=str(data / "{site}"), train={"epochs": 1, "torch_threads": 1})
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=False)

    reply = executor.execute("train", Shareable(), fl_ctx, Signal())

    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert executor._refusal.startswith("site data refused this job at site-1: ")
    assert "NotADirectoryError" in executor._refusal or "FileExistsError" in executor._refusal
