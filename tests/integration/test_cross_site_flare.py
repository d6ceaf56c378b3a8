"""Cross-site evaluation through FLARE's simulator: the demo (training, then FLARE's
CrossSiteModelEval in the same session, then the clinical report and model card), the HTML
report in headless Chromium, and the standalone job a lead submits after training."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from hospital_fl.apps.cxr_demo import CLINICAL_FILES, OUTPUT_FILES, DemoConfig, run_demo
from hospital_fl.data.federated import load_federated
from hospital_fl.data.ingest.site_dataset import SITE_STATE_ENV
from hospital_fl.data.splits import SplitConfig
from hospital_fl.flare.cross_site import cross_site_matrix, read_cross_site_results
from hospital_fl.flare.runners.cross_site import run_cross_site_job_in_simulator
from hospital_fl.flare.runners.simulator import environment
from hospital_fl.jobspec import JobSpec
from hospital_fl.training.config import TrainConfig

pytestmark = pytest.mark.integration

SMALL = JobSpec(num_rounds=1, split=SplitConfig(num_sites=2), train=TrainConfig(torch_threads=1))
SITES = ("site-1", "site-2")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross_site")
    out, state = root / "out", root / "site_state"
    with environment({SITE_STATE_ENV: str(state)}):  # where the simulated sites keep their local models
        report = run_demo(DemoConfig(spec=SMALL, out_dir=out, workspace=root / "ws"))
    return root, out, state, report


def test_every_site_scored_every_model_on_its_own_data_only(demo):
    _, _, _, report = demo
    results = read_cross_site_results(report["settings"]["flare_result"])
    data = load_federated(SMALL.split)

    # FLARE files each cell under the client that sent it, as it authenticated it
    assert sorted(results) == list(SITES)
    for sender, cells in results.items():
        assert {c["data_site"] for c in cells.values()} == {sender}
        assert {c["n_test"] for c in cells.values()} == {len(data.site(sender).test)}
    cs = report["cross_site"]
    n_global = len(cs["models"]) - len(SITES)  # the final global model, and the best round's when saved
    assert np.array(cs["auc"]).shape == (n_global + len(SITES), len(SITES)) and n_global in (1, 2)
    assert cs["models"][0] == "global" and cs["models"][n_global:] == [f"{s} local" for s in SITES]
    assert cs["sites"] == list(SITES) and cs["missing"] == {}
    # the global row is the AUC this process computes from the global model on each site's test data
    for j, site in enumerate(report["sites"]):
        assert cs["auc"][0][j] == pytest.approx(site["auc"], abs=1e-6)
        assert site["auc_ci95"] == cs["ci95"][0][j]


def test_the_report_has_the_clinical_sections_and_the_card(demo):
    _, out, _, report = demo

    for name in OUTPUT_FILES + CLINICAL_FILES:
        assert (out / name).stat().st_size > 0, name
    p = report["personalization"]
    assert [s["site"] for s in p["sites"]] == list(SITES) and all("auc_personalized" in s for s in report["sites"])
    assert set(report["operating_points"]["sites"]) == set(SITES)
    assert set(report["calibration"]["sites"]) == set(SITES)
    assert report["gradcam"]["n_correct"] + report["gradcam"]["n_incorrect"] > 0
    assert report["timing"]["cross_site_seconds"] > 0 and report["settings"]["cross_site"] is True
    md = (out / "report.md").read_text()
    for heading in (
        "## Cross-site evaluation",
        "## Personalization",
        "## Operating points",
        "## Calibration",
        "## Class activation maps, Grad-CAM family",
    ):
        assert heading in md
    page = (out / "model_card.html").read_text()
    assert page.count('src="data:image/png;base64,') == 7 and "http" not in page
    assert json.loads((out / "report.json").read_text())["cross_site"] == report["cross_site"]


def test_the_html_report_renders_in_headless_chromium(demo, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from PIL import Image

    _, out, _, _ = demo
    shot = tmp_path / "report.png"

    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            (out / "model_card.html").resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )

    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (900, 1200)
    # not blank: dark text on a light page, many grey levels (anti-aliased glyphs, table borders)
    assert (image < 100).mean() > 0.005 and len(np.unique(image)) > 20


def test_the_standalone_job_scores_the_same_models_from_the_kept_local_models(demo):
    root, out, state, report = demo

    results = run_cross_site_job_in_simulator(SMALL, out / "global_model.pt", root / "ws", state)

    matrix, missing = cross_site_matrix(results, SITES)
    assert matrix.models == ("global", *[f"{s} local" for s in SITES]) and missing == {}
    demo_rows = {m: i for i, m in enumerate(report["cross_site"]["models"])}
    for i, model in enumerate(matrix.models):  # the same models on the same data: the same cells
        np.testing.assert_allclose(matrix.auc_array()[i], report["cross_site"]["auc"][demo_rows[model]])
    for site in SITES:
        assert json.loads((state / site / "cross_site" / "chest_x_ray_last_local_model.json").read_text())["round"] == 0
