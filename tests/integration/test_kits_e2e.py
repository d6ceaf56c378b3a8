"""From provisioned kits to a finished job on loopback: the kits' own start scripts, the
admin API, and the refusals a consortium relies on (foreign CA, tampered kit, a role
without submit rights, a privacy scope or job type a site does not allow, a component class
no site approved)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from hospital_fl.audit import read_trail, verify_trail
from hospital_fl.bench.provision import TINY_JOB, free_ports
from hospital_fl.flare.kits.provision import add_site, provision
from hospital_fl.flare.profile_job import ProfileRecipe
from hospital_fl.flare.recipes.cxr import export_job
from hospital_fl.flare.runners.poc import (
    connected_clients,
    kit_env,
    poc_processes,
    run_job,
    running_system,
    submit_folder,
    system_from_kits,
    wait_for_job,
)
from hospital_fl.privacy.setup import init_site_privacy
from hospital_fl.provisioning.rehearsal import MEMBER, PROJECT_ADMIN, loopback_site_configs, write_site_configs
from nvflare.fuel.flare_api.api_spec import AuthorizationError
from nvflare.fuel.flare_api.flare_api import new_secure_session

pytestmark = pytest.mark.integration


def _for_sites(job_dir: Path, sites: list[str], **meta_changes) -> Path:
    """The job deployed to the server and ``sites`` only, with other meta changes (e.g. scope)."""
    meta_file = job_dir / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["deploy_map"] = {app: ["server", *sites] for app in meta["deploy_map"]}
    meta_file.write_text(json.dumps({**meta, "min_clients": len(sites), **meta_changes}, indent=2))
    return job_dir


def _deploy_refusal(live, job_id: str) -> str:
    """Wait for a job that cannot deploy; returns its status and what the server logged about it."""
    meta = wait_for_job(live, job_id, timeout_s=120)
    server_log = (live.system.kit(live.system.server) / "log.txt").read_text()
    return f"{meta['status']}\n{json.dumps(meta)}\n{server_log}"


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    pytest.importorskip("tenseal")  # HE on: kits are signed, as hospitals will run them
    root = tmp_path_factory.mktemp("kits_e2e")
    fl_port, admin_port = free_ports(2)
    configs = write_site_configs(root / "site_configs", *loopback_site_configs(fl_port, admin_port))
    issued = provision(configs, root / "out")
    system = system_from_kits(issued.out_dir / "kits", PROJECT_ADMIN)
    with running_system(system) as live:
        yield root, configs, issued, live
    assert not poc_processes(issued.out_dir / "kits")  # every process the test started is gone


def test_a_tiny_job_runs_from_the_kits_start_scripts(consortium):
    root, _, _, live = consortium
    job = export_job(TINY_JOB, root / "jobs")

    run = run_job(live, job, root / "result", timeout_s=300)

    assert [entry["round"] for entry in run.history] == [0, 1]
    for entry in run.history:
        assert sorted(site["site"] for site in entry["sites"]) == ["site-1", "site-2"]
        assert all(site["accepted"] for site in entry["sites"])
    assert run.global_model_path.is_file()


def test_a_job_naming_bundle_functions_is_refused_at_deploy_and_runs_nothing(consortium):
    root, _, issued, live = consortium
    site_1 = issued.out_dir / "kits" / "site-1"
    init_site_privacy(site_1, "site-1")  # keeps a ledger the first job made
    ledger = {p.name: p.read_bytes() for p in (site_1 / "privacy").iterdir()}
    target, fresh = root / "written_by_a_job.sh", root / "fresh_site"
    harm = {
        "hospital_fl.flare.provision.write": {"file_full_path": str(target), "content": "x", "mode": "t", "exe": True},
        "hospital_fl.flare.recipes.cxr.export_recipe": {"recipe": "any", "name": "privacy", "jobs_dir": str(site_1)},
        "hospital_fl.privacy.setup.init_site_privacy": {"workspace_root": str(fresh), "site": "site-1"},
    }
    job = _for_sites(export_job(TINY_JOB, root / "jobs_functions"), ["site-1", "site-2"])
    client_file = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_file.read_text())
    client["components"] += [{"id": f"harm{i}", "path": path, "args": a} for i, (path, a) in enumerate(harm.items())]
    client_file.write_text(json.dumps(client))

    refusal = _deploy_refusal(live, submit_folder(live.session, job))

    assert "site-1 refuses the job: component 'hospital_fl.flare.provision.write' at components[1].path" in refusal
    assert "is not an approved class" in refusal
    assert not target.exists() and not fresh.exists()
    assert {p.name: p.read_bytes() for p in (site_1 / "privacy").iterdir()} == ledger


def test_a_member_cannot_submit_a_job(consortium):
    root, _, issued, _ = consortium
    job = export_job(TINY_JOB, root / "jobs_member")
    session = new_secure_session(MEMBER, str(issued.out_dir / "kits" / MEMBER), timeout=10.0)
    try:
        with pytest.raises(AuthorizationError, match="not authorized"):
            submit_folder(session, job)
    finally:
        session.close()


def test_a_hospital_added_later_joins_and_its_scope_and_job_types_are_enforced(consortium):
    root, configs, issued, live = consortium
    consortium_yaml, (site,) = loopback_site_configs(1, 2, hospitals=("site-3",))
    site = {**site, "privacy": {**site["privacy"], "scope": "dp_required"}, "allowed_job_types": ["cxr"]}
    write_site_configs(root / "site-3", consortium_yaml, [site])
    add_site(configs, root / "site-3" / "hospitals" / "site-3.yaml", issued.out_dir)

    live.start_clients(("site-3",), timeout_s=120)  # the running server accepts the new kit, no restart
    assert "site-3" in connected_clients(live.session)

    public = _for_sites(export_job(TINY_JOB, root / "jobs_public"), ["site-3"], scope="public")
    refusal = _deploy_refusal(live, submit_folder(live.session, public))
    assert "privacy scope 'public' is not allowed" in refusal

    profile_dir = root / "jobs_profile"
    ProfileRecipe("/nowhere/{site}", num_sites=1).export(str(profile_dir))
    profile = _for_sites(profile_dir / "site_profiles", ["site-3"])
    refusal = _deploy_refusal(live, submit_folder(live.session, profile))
    assert "site-3 refuses the job: job type 'profile' is not among the site's allowed_job_types (cxr)" in refusal


def test_a_client_of_another_projects_ca_cannot_join(consortium):
    root, _, issued, live = consortium
    server = yaml.safe_load((issued.out_dir / "project.yml").read_text())["participants"][0]
    same_server = loopback_site_configs(
        server["fed_learn_port"], server["admin_port"], hospitals=("site-4",), project="another_consortium"
    )
    foreign = provision(write_site_configs(root / "foreign", *same_server), root / "foreign_out")
    shutil.copytree(foreign.out_dir / "kits" / "site-4", issued.out_dir / "kits" / "site-4")

    with pytest.raises(TimeoutError, match="site-4 did not register"):
        live.start_clients(("site-4",), timeout_s=25)
    assert "site-4" not in connected_clients(live.session)
    assert {"site-1", "site-2"} <= connected_clients(live.session)


def test_a_kit_with_a_tampered_signed_file_does_not_start(consortium):
    root, _, issued, _ = consortium
    kit = Path(shutil.copytree(issued.out_dir / "kits" / "site-2", root / "tampered" / "site-2"))
    config = kit / "startup" / "fed_client.json"
    config.write_text(config.read_text().replace('"client": {', '"client": {"tampered": 1, ', 1))

    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(kit / "startup" / "sub_start.sh"), "--once"],
        cwd=kit,
        env=kit_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode != 0
    assert "The following files are not secure content" in done.stdout
    assert "fed_client.json" in done.stdout
    assert time.monotonic() - started < 120


def test_the_server_audit_trail_names_each_job_its_submitter_and_its_end(consortium):
    _, _, issued, _ = consortium
    trail = issued.out_dir / "kits" / "localhost" / "audit.jsonl"

    assert verify_trail(trail).ok
    records = read_trail(trail)
    deployed = [r for r in records if r.event == "job.deployed"]
    assert deployed and all(r.actor == PROJECT_ADMIN for r in deployed)
    assert deployed[0].details["sites"] == ["@ALL"] and deployed[0].details["submitter_role"] == "project_admin"
    ends = {r.details["job_id"]: r.event for r in records if r.event in ("job.completed", "job.aborted")}
    assert ends[deployed[0].details["job_id"]] == "job.completed"
    # the jobs site-3 refused never deployed, and their end is on record too
    assert len(ends) >= 3

    operator = verify_trail(issued.out_dir / "audit.jsonl")
    assert operator.ok
    issued_kits = [r.details["name"] for r in read_trail(issued.out_dir / "audit.jsonl") if r.event == "kit.issued"]
    assert "site-3" in issued_kits and "site-1" in issued_kits
