"""A site operator's mistake: ingest killed (SIGKILL) or out of disk at every step of a commit.

A real ingest of real chest X-rays (PneumoniaMNIST wrapped as CR files) is re-run with new files
and new labels; it is killed in a subprocess, or its writes fail with ENOSPC in-process, before,
during and between the pixel and manifest writes, at the switch and after it. Every time, the
site folder must load (manifest + pixels, hash-checked) as exactly the old dataset or exactly the
new one, never new pixels with old labels; and the next ingest must finish cleanly.
"""

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import upscale, write_cxr
from hospital_fl.data.ingest import manifest as manifest_mod
from hospital_fl.data.ingest.consent import read_consent
from hospital_fl.data.ingest.labels import read_labels
from hospital_fl.data.ingest.manifest import load_images, read_manifest
from hospital_fl.data.ingest.pipeline import IngestConfig, ingest
from hospital_fl.errors import InputError

STEPS = ("before_images", "during_images", "between_writes", "before_switch", "after_switch", "collect_garbage")
BEFORE_SWITCH = {"before_images", "during_images", "between_writes", "before_switch"}


@pytest.fixture(scope="module")
def sites(tmp_path_factory, federated_data):
    """An old dataset (8 images), and the expected result of re-ingesting with 4 more files and
    every label flipped (so a mix of new pixels and old labels would show)."""
    root = tmp_path_factory.mktemp("crash")
    source = federated_data.sites[1].train
    pacs = root / "pacs"
    for i in range(12):
        write_cxr(pacs / f"img{i:02d}.dcm", upscale(source.images[i], 256), patient_id=f"P{i:02d}")
    (root / "old.csv").write_text("file,label\n" + "".join(f"img{i:02d}.dcm,{i % 2}\n" for i in range(8)))
    (root / "new.csv").write_text("file,label\n" + "".join(f"img{i:02d}.dcm,{1 - i % 2}\n" for i in range(12)))
    (root / "consent.csv").write_text(
        "patient_id,status,date\n" + "".join(f"P{i:02d},granted,2026-01-01\n" for i in range(12))
    )
    old = root / "old"
    _ingest(root, old, "old.csv")
    new = root / "new"
    shutil.copytree(old, new)
    _ingest(root, new, "new.csv")
    return root, _snapshot(old), _snapshot(new)


def _ingest(root: Path, site: Path, labels: str):
    return ingest(
        root / "pacs",
        read_labels(root / labels),
        site,
        read_consent(root / "consent.csv"),
        IngestConfig(image_size=28, workers=1),
    )


def _snapshot(site: Path) -> tuple:
    manifest = read_manifest(site)  # raises on a manifest that does not parse
    images = np.array(load_images(site, manifest))  # raises on pixels that are not the committed ones
    return [(r.image_id, r.labels, r.row) for r in manifest.records], images


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1])


_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from hospital_fl.data.ingest import manifest
    from hospital_fl.data.ingest.consent import read_consent
    from hospital_fl.data.ingest.labels import read_labels
    from hospital_fl.data.ingest.pipeline import IngestConfig, ingest

    root, site, step = sys.argv[1], sys.argv[2], sys.argv[3]
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if step == "during_images":  # half the pixel file written
        write = manifest._HashingFile.write
        calls = []
        def partial(self, data):
            calls.append(1)
            if len(calls) == 2:
                kill()
            return write(self, data)
        manifest._HashingFile.write = partial
    else:
        manifest._commit_step = lambda name: kill() if name == step else None
    ingest(root + "/pacs", read_labels(root + "/new.csv"), site, read_consent(root + "/consent.csv"),
           IngestConfig(image_size=28, workers=1))
    print("finished without being killed")
    """
)


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_any_step_leaves_the_old_or_the_new_dataset_never_a_mix(sites, step, tmp_path):
    root, old, new = sites
    site = tmp_path / "site"
    shutil.copytree(root / "old", site)

    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, str(root), str(site), step], capture_output=True, text=True, timeout=120
    )

    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    after = _snapshot(site)
    assert _same(after, old if step in BEFORE_SWITCH else new), step
    # the next ingest recovers: it commits the new dataset and leaves one images file
    _ingest(root, site, "new.csv")
    assert _same(_snapshot(site), new)
    assert len(list(site.glob("images.g*.npy"))) == 1 and not list(site.glob(".*.tmp"))


@pytest.mark.parametrize("fsync_call", [1, 2, 3, 4])
def test_a_full_disk_at_each_fsync_leaves_a_loadable_dataset(sites, fsync_call, tmp_path, monkeypatch):
    """fsync is where a full disk shows on file systems that allocate late: 1 pixels, 2 manifest,
    3 the folder after the switch, 4 the ingest cache."""
    root, old, new = sites
    site = tmp_path / "site"
    shutil.copytree(root / "old", site)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == fsync_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(InputError, match="disk is full|No space left"):
        _ingest(root, site, "new.csv")
    monkeypatch.undo()

    assert _same(_snapshot(site), old if fsync_call <= 2 else new)
    _ingest(root, site, "new.csv")
    assert _same(_snapshot(site), new)


@pytest.mark.parametrize("step", [s for s in STEPS if s != "during_images"])
def test_enospc_raised_at_each_step_keeps_a_whole_dataset(sites, step, tmp_path, monkeypatch):
    root, old, new = sites
    site = tmp_path / "site"
    shutil.copytree(root / "old", site)

    def full(name):
        if name == step:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest_mod, "_commit_step", full)
    if step == "collect_garbage":  # after a durable switch: nothing can be lost any more
        _ingest(root, site, "new.csv")
    else:
        with pytest.raises(InputError, match="the disk is full"):
            _ingest(root, site, "new.csv")

    assert _same(_snapshot(site), old if step in BEFORE_SWITCH else new)
    if step in BEFORE_SWITCH:
        assert len(list(site.glob("images.g*.npy"))) == 1  # the partial generation was removed


def test_enospc_midway_through_the_pixels(sites, tmp_path, monkeypatch):
    root, old, _ = sites
    site = tmp_path / "site"
    shutil.copytree(root / "old", site)
    write, calls = manifest_mod._HashingFile.write, []

    def partial(self, data):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(manifest_mod._HashingFile, "write", partial)
    with pytest.raises(InputError, match="the disk is full.*previous dataset is kept"):
        _ingest(root, site, "new.csv")

    assert _same(_snapshot(site), old)


def test_pixels_swapped_under_a_manifest_are_refused(sites, tmp_path):
    """The failure the old layout allowed: new pixels beside old labels must not load."""
    root, _, _ = sites
    site = tmp_path / "site"
    shutil.copytree(root / "old", site)
    manifest = read_manifest(site)
    pixels = site / manifest.images_file
    swapped = np.load(pixels)[::-1].copy()
    np.save(pixels, swapped)

    with pytest.raises(InputError, match="pixels and labels are from different ingests"):
        load_images(site, manifest)
