"""The example consortium (site_configs/: hospital-a, -b, -c) operated through FLARE's own admin
console: the kits `hospital-fl provision` issues start on this machine's loopback, and the
project admin's `startup/fl_admin.sh` is driven through stdin the way a person types it:
submit the DP job, list jobs, wait, download the result, bye.

Changes to the shipped site configs, for this machine only: free loopback ports, and no GPUs
(FLARE's GPU resource manager refuses to start a site that declares GPUs it does not have).
Each hospital trains on its own share of the embedded chest X-rays, ingested from DICOM as a
hospital's PACS export would be. docs/operations-console.md shows a session this test ran.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from dicom_factory import ingest_export, upscale, write_cxr
from hospital_fl.bench.provision import free_ports
from hospital_fl.flare.kits.provision import provision
from hospital_fl.flare.recipes.cxr import export_job, read_job_folder
from hospital_fl.flare.runners.poc import kit_env, poc_processes, running_system, system_from_kits
from hospital_fl.flare.runners.simulator import GLOBAL_MODEL_FILE
from hospital_fl.privacy.ledger import PrivacyLedger
from hospital_fl.privacy.setup import init_site_privacy
from hospital_fl.provisioning.rehearsal import PROJECT_ADMIN

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "site_configs"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
PER_SITE = 80  # chest X-rays each hospital's PACS export holds
EPSILON = 3.0  # within every hospital's max_job_epsilon (hospital-b allows 4)


def _example_on_loopback(folder: Path) -> Path:
    """The shipped site configs with free loopback ports and no GPUs."""
    configs = Path(shutil.copytree(EXAMPLE, folder))
    consortium = yaml.safe_load((configs / "consortium.yaml").read_text())
    consortium["fl_port"], consortium["admin_port"] = free_ports(2)
    (configs / "consortium.yaml").write_text(yaml.safe_dump(consortium, sort_keys=False))
    for path in (configs / "hospitals").glob("*.yaml"):
        hospital = yaml.safe_load(path.read_text())
        hospital.update(gpus=0, gpu_memory_gb=0, resources={"num_of_gpus": 0, "mem_per_gpu_in_GiB": 0})
        path.write_text(yaml.safe_dump(hospital, sort_keys=False))
    return configs


def _ingest_embedded(federated_data, root: Path) -> Path:
    """Each hospital's PACS export (DICOM wrapping its share of the embedded chest X-rays),
    ingested into root/<hospital>; returns root."""
    for index, hospital in enumerate(HOSPITALS):
        source, export = federated_data.sites[index].train, root / f"{hospital}-pacs"
        rows, consent = [], []
        for i in range(min(PER_SITE, len(source))):
            patient = f"{hospital}-P{i:04d}"
            write_cxr(export / f"img{i:04d}.dcm", upscale(source.images[i], 256), patient_id=patient)
            rows.append(f"img{i:04d}.dcm,{int(source.labels[i])}")
            consent.append(f"{patient},granted,2026-01-01")
        ingest_export(export, rows, consent, root, hospital, root / hospital)
    return root


def _own_job_store(server_kit: Path, folder: Path) -> None:
    """Keep the server's job records in ``folder``: the issued kit keeps FLARE's default
    /tmp/nvflare/jobs-storage, which every FLARE server on a machine shares. (local/ is not
    checked against the kit's signatures when the server starts; startup/ is.)"""
    resources = server_kit / "local" / "resources.json"
    text = resources.read_text()
    for default in ("/tmp/nvflare/jobs-storage", "/tmp/nvflare/snapshot-storage"):
        assert default in text
        text = text.replace(default, str(folder / Path(default).name))
    resources.write_text(text)


def _status_of(job_id: str, listing: str) -> str:
    """The STATUS column of ``job_id``'s row in a `list_jobs` table."""
    row = next(line for line in listing.splitlines() if job_id in line)
    return row.split("|")[3].strip()


class Console:
    """``fl_admin.sh`` with a person at the keyboard: type a line, read until the next prompt."""

    PROMPT = re.compile(rb"(> |User Name: )$")

    def __init__(self, kit: Path):
        self.proc = subprocess.Popen(
            ["bash", str(kit / "startup" / "fl_admin.sh")],
            cwd=kit,
            env=kit_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.output, self.read_to = bytearray(), 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(4096):
            self.output += chunk

    def prompt(self, timeout_s: float = 60) -> str:
        """Everything printed since the last prompt, up to and including the next one."""
        deadline = time.monotonic() + timeout_s
        while not self.PROMPT.search(bytes(self.output[self.read_to :])):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"no prompt from fl_admin.sh; it printed:\n{self.output.decode(errors='replace')}")
            time.sleep(0.1)
        text = self.output[self.read_to :].decode(errors="replace")
        self.read_to = len(self.output)
        return text

    def type(self, line: str, timeout_s: float = 60) -> str:
        """Type ``line`` and Enter; returns what the console printed up to its next prompt."""
        self.output += line.encode() + b"\n"  # the transcript shows what was typed, as a terminal does
        self.read_to = len(self.output)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.prompt(timeout_s)

    def close(self) -> None:
        """End the console if a failure left it running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def bye(self) -> int:
        self.output += b"bye\n"
        self.proc.stdin.write(b"bye\n")
        self.proc.stdin.close()
        code = self.proc.wait(timeout=30)
        self._reader.join(5)
        return code

    @property
    def transcript(self) -> str:
        return self.output.decode(errors="replace")


def test_the_example_consortium_runs_a_dp_job_typed_into_flares_admin_console(tmp_path, federated_data):
    configs = _example_on_loopback(tmp_path / "site_configs")
    issued = provision(configs, tmp_path / "consortium")
    kits = issued.out_dir / "kits"
    _own_job_store(kits / "localhost", tmp_path / "server_store")
    for hospital in HOSPITALS:  # each privacy officer: `hospital-fl privacy init <kit> --site <name>`
        init_site_privacy(kits / hospital, hospital)
    data = _ingest_embedded(federated_data, tmp_path / "data")
    admin_kit = kits / PROJECT_ADMIN
    shipped = read_job_folder(EXAMPLE.parent / "jobs" / "cxr_fedavg_dp")  # epsilon 8 there: hospital-b allows 4
    spec = dataclasses.replace(
        shipped,
        num_rounds=2,
        split=dataclasses.replace(shipped.split, num_sites=len(HOSPITALS)),
        site_data=str(data / "{site}"),
        privacy=dataclasses.replace(shipped.privacy, target_epsilon=EPSILON),
        train=dataclasses.replace(shipped.train, torch_threads=1),
    )
    export_job(spec, admin_kit / "transfer")  # the job the admin submits by name

    with running_system(system_from_kits(kits, PROJECT_ADMIN)):
        console = Console(admin_kit)
        try:
            console.prompt()
            console.type(PROJECT_ADMIN)
            submitted = console.type("submit_job cxr_fedavg_dp")
            job_id = re.search(r"Submitted job: ([0-9a-f-]+)", submitted).group(1)
            deadline = time.monotonic() + 300
            while not (status := _status_of(job_id, console.type("list_jobs"))).startswith("FINISHED"):
                assert time.monotonic() < deadline, "the job did not finish within 300 s"
                time.sleep(5)
            assert status == "FINISHED:COMPLETED", console.transcript
            downloaded = console.type(f"download_job {job_id}")
            assert console.bye() == 0
        finally:
            console.close()
    assert not poc_processes(kits)
    (tmp_path / "console_transcript.txt").write_text(console.transcript)
    print(f"\nCONSOLE_TRANSCRIPT {tmp_path / 'console_transcript.txt'}")

    assert "Error:" not in console.transcript
    assert f"content downloaded to {admin_kit}" in downloaded.replace("/startup/../", "/")
    result = admin_kit / "transfer" / job_id
    assert json.loads((result / "meta.json").read_text())["status"] == "FINISHED:COMPLETED"
    history = json.loads(next(result.rglob("round_history.json")).read_text())
    assert [entry["round"] for entry in history] == [0, 1]
    for entry in history:
        assert sorted(site["site"] for site in entry["sites"]) == list(HOSPITALS)
        assert all(site["accepted"] and site["privacy"] for site in entry["sites"])
    assert next(result.rglob(GLOBAL_MODEL_FILE)).is_file()
    for hospital in HOSPITALS:  # each hospital's ledger: what this job spent there, within its cap
        spent = PrivacyLedger(kits / hospital / "privacy" / "ledger.json").epsilon(1e-5)
        assert 0 < spent <= EPSILON + 1e-9
