"""The clinical sections of the report: computed from a model and the sites' data, added to
report.json without touching its contract keys, and rendered into report.md and the model card."""

import numpy as np
import pytest
import torch
from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical.calibration import expected_calibration_error
from hospital_fl.evaluation.clinical.cross_site import site_cell
from hospital_fl.evaluation.clinical.operating_point import sensitivity_specificity, threshold_for_sensitivity
from hospital_fl.evaluation.clinical.personalization import PersonalizationConfig, personalize
from hospital_fl.evaluation.clinical_render import card_sections, render_clinical_markdown
from hospital_fl.evaluation.clinical_report import (
    calibration_section,
    cross_site_section,
    operating_point_section,
)
from hospital_fl.evaluation.report import attach_clinical, render_markdown
from hospital_fl.evaluation.scoring import score_model
from hospital_fl.flare.cross_site import cross_site_matrix
from hospital_fl.models.cxr import build_cxr_model
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import predict_proba
from test_clinical_model_card import _report  # a build_report report on the embedded data


@pytest.fixture(scope="module")
def model_and_scores(federated_data):
    torch.manual_seed(0)
    model = build_cxr_model()
    return model, score_model(model, federated_data, "cpu")


def test_operating_points_use_the_pooled_validation_threshold_and_each_sites_own(federated_data, model_and_scores):
    model, scores = model_and_scores

    op = operating_point_section(model, federated_data, scores, 0.9)

    val = [predict_proba(model, s.val.images, "cpu") for s in federated_data.sites]
    pooled = threshold_for_sensitivity(
        np.concatenate([s.val.labels for s in federated_data.sites]), np.concatenate(val), 0.9
    )
    assert op["consortium_threshold"] == pooled and op["target_sensitivity"] == 0.9
    for site, v in zip(federated_data.sites, val):
        entry = op["sites"][site.name]
        assert (
            entry["consortium_threshold"]
            == sensitivity_specificity(site.test.labels, scores.per_site[site.name], pooled).to_dict()
        )
        own = threshold_for_sensitivity(site.val.labels, v, 0.9)
        assert entry["site_threshold"]["threshold"] == own and entry["site_threshold"]["validation_sensitivity"] >= 0.9


def test_calibration_gives_each_sites_ece_and_the_held_out_comparison(federated_data, model_and_scores, tmp_path):
    _, scores = model_and_scores

    cal = calibration_section(federated_data, scores, scores, 10, tmp_path)

    site = federated_data.sites[1]
    assert cal["sites"][site.name] == expected_calibration_error(site.test.labels, scores.per_site[site.name])
    assert cal["held_out"]["federated"] == cal["held_out"]["centralized"]  # same scores passed twice
    assert (tmp_path / cal["plot"]).read_bytes()[:4] == b"\x89PNG"


def _cross_site_results(data):
    rng = np.random.default_rng(0)
    return {
        s.name: {
            owner: site_cell(s.name, s.test.labels, rng.uniform(size=len(s.test)), n_boot=200).to_metrics()
            for owner in ("SRV_FL_global_model.pt", *[t.name for t in data.sites])
        }
        for s in data.sites
    }


def test_sections_extend_report_json_and_render_into_report_md_and_the_card(federated_data, model_and_scores, tmp_path):
    model, scores = model_and_scores
    report = _report(federated_data)
    matrix, missing = cross_site_matrix(_cross_site_results(federated_data), federated_data.site_names)
    sections = {
        "cross_site": cross_site_section(matrix, missing, tmp_path),
        "operating_points": operating_point_section(model, federated_data, scores),
        "calibration": calibration_section(federated_data, scores, scores),
    }
    ci = {s: [matrix.cell("global", s).low, matrix.cell("global", s).high] for s in matrix.sites}

    extended = attach_clinical(report, sections, ci, {"site-1": 0.5})

    for key, value in report.items():  # the contract: every key kept, none renamed or changed
        if key != "sites":
            assert extended[key] == value
    for before, after in zip(report["sites"], extended["sites"]):
        assert after == {
            **before,
            "auc_ci95": ci[before["name"]],
            **({"auc_personalized": 0.5} if before["name"] == "site-1" else {}),
        }
    assert extended["cross_site"]["models"] == ["global"] + [f"{s} local" for s in federated_data.site_names]
    md = render_markdown(extended)
    c = matrix.cell("site-2 local", "site-3")
    assert (
        "## Cross-site evaluation (AUC, bootstrap 95% CI)" in md
        and f"{c.estimate:.3f} ({c.low:.3f}-{c.high:.3f})" in md
    )
    assert "## Operating points (target sensitivity 0.95)" in md and "## Calibration" in md
    assert (
        "Plots: roc.png, rounds.png, sites.png, cross_site.png, reliability.png" not in md
    )  # no reliability plot drawn
    assert "Plots: roc.png, rounds.png, sites.png, cross_site.png" in md
    headings = [s.heading for s in card_sections(extended)]
    assert headings == [
        "Cross-site evaluation (AUC, 95% CI)",
        "Operating points (target sensitivity 0.95)",
        "Calibration",
    ]
    assert render_clinical_markdown(report) == ""
    with pytest.raises(ValueError, match="unknown clinical sections"):
        attach_clinical(report, {"sites": []})


def test_a_site_keeps_its_fine_tuned_copy_only_when_it_beats_the_global_model_on_validation(federated_data):
    site = federated_data.site("site-3")
    torch.manual_seed(0)
    untrained = build_cxr_model()
    cfg = PersonalizationConfig(epochs=1, train=TrainConfig(device="cpu", lr=2e-3), select_on_validation=True)

    better = personalize(
        untrained, site.train.images, site.train.labels, cfg, validation=(site.val.images, site.val.labels)
    )
    # the same fine-tuning judged on flipped labels: it now looks worse than the untrained model
    worse = personalize(
        untrained, site.train.images, site.train.labels, cfg, validation=(site.val.images, 1 - site.val.labels)
    )

    assert not better.kept_global and better.validation_aucs[1] > better.validation_aucs[0]
    assert worse.kept_global and worse.validation_aucs[1] <= worse.validation_aucs[0]
    for name, value in untrained.state_dict().items():
        assert torch.equal(worse.model.state_dict()[name], value)
    with pytest.raises(InputError, match="validation: got None; select_on_validation compares the models"):
        personalize(untrained, site.train.images, site.train.labels, cfg)
