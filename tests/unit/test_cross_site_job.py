"""The cross-site evaluation jobs: the committed folder is the export, and a hospital's own
checks (approved classes, allowed job types) let it run, as they let training run."""

import filecmp
import json
from pathlib import Path

import pytest
from hospital_fl.errors import InputError
from hospital_fl.flare.job_type_gate import JobTypeValidator
from hospital_fl.flare.recipes.cross_site import (
    CROSS_SITE_JOB,
    CrossSiteEvalRecipe,
    add_cross_site_eval,
    export_cross_site_job,
)
from hospital_fl.flare.recipes.cxr import build_recipe, export_recipe
from hospital_fl.jobspec import JobSpec
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.he_params import CKKSParams

JOBS = Path(__file__).resolve().parents[2] / "jobs"
CSE = "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval"


def test_the_committed_cross_site_job_equals_a_fresh_export(tmp_path):
    export_cross_site_job(tmp_path)

    cmp = filecmp.dircmp(JOBS / CROSS_SITE_JOB, tmp_path / CROSS_SITE_JOB)
    stack, differences = [cmp], []
    while stack:
        c = stack.pop()
        differences += c.left_only + c.right_only + c.diff_files
        stack += c.subdirs.values()
    assert not differences, f"jobs/{CROSS_SITE_JOB} is stale; run: hospital-fl export-jobs --jobs-dir jobs"
    assert not list((JOBS / CROSS_SITE_JOB).rglob("*.py")) and not (JOBS / CROSS_SITE_JOB / "app" / "custom").exists()


def test_the_job_reads_the_global_model_from_the_server_path_and_asks_sites_for_their_models(tmp_path):
    folder = export_cross_site_job(tmp_path, global_model="/srv/models/FL_global_model.pt")
    server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())

    assert [w["path"] for w in server["workflows"]] == [CSE]
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"] == {"source_ckpt_file_full_name": "/srv/models/FL_global_model.pt"}
    (executor,) = client["executors"]
    assert executor["tasks"] == ["submit_model", "validate"]
    assert executor["executor"]["path"] == "hospital_fl.flare.executor.CXRTrainExecutor"


@pytest.mark.parametrize("job", ["committed", "training_then_evaluation"])
def test_a_hospital_that_allows_cxr_jobs_accepts_it_and_one_that_does_not_refuses(job, tmp_path):
    if job == "committed":
        app = JOBS / CROSS_SITE_JOB / "app"
    else:
        app = export_recipe(add_cross_site_eval(build_recipe(JobSpec())), JobSpec().name, tmp_path) / "app"
        server = json.loads((app / "config" / "config_fed_server.json").read_text())
        client = json.loads((app / "config" / "config_fed_client.json").read_text())
        assert [w["path"].rsplit(".", 1)[-1] for w in server["workflows"]] == [
            "RoundPolicyFedAvg",
            "CrossSiteModelEval",
        ]
        assert client["executors"][0]["tasks"] == ["train", "submit_model", "validate"]

    assert JobTypeValidator(["cxr"], site="site-1").validate(str(app)) == ("", {})
    refusal, _ = JobTypeValidator(["segmentation"], site="site-1").validate(str(app))
    assert refusal.startswith("site-1 refuses the job: job type 'cxr' is not among the site's allowed_job_types")


def test_jobs_cross_site_evaluation_cannot_serve_are_refused_with_the_reason():
    with pytest.raises(InputError, match=r"he: got 'on'; the server of an HE job holds only the encrypted"):
        add_cross_site_eval(build_recipe(JobSpec(he=CKKSParams())))
    with pytest.raises(InputError, match=r"privacy: got 'sample'; under DP each site keeps its scores"):
        CrossSiteEvalRecipe(JobSpec(privacy=DPConfig("sample", 8.0)))
    with pytest.raises(InputError, match=r"global_model: got 'models/global.pt'; it must be an absolute path"):
        CrossSiteEvalRecipe(JobSpec(), "models/global.pt")
