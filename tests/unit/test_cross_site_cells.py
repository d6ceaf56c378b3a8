"""Cross-site cells: what a site computes and sends, and the rules the matrix is built under.

The cells come from real bootstrap intervals on synthetic scores; the FLARE side's reading
(hospital_fl.flare.cross_site.cross_site_matrix) is fed results in the layout FLARE's
ValidationJsonGenerator writes: {sender: {model owner: metrics}}.
"""

import numpy as np
import pytest
from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical.bootstrap import bootstrap_auc
from hospital_fl.evaluation.clinical.cross_site import SiteCell, complete_models, matrix_from_cells, site_cell
from hospital_fl.flare.cross_site import cross_site_matrix, cross_site_seconds, model_label

SITES = ("site-1", "site-2")


def _scores(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * (n // 2))
    return labels, 1 / (1 + np.exp(-(2.0 * (labels - 0.5) + rng.normal(0, 1, n))))


def _results(n_test=(60, 40)) -> dict:
    """FLARE's layout: each sender's cells for the final global model and each local model."""
    out = {}
    for i, (site, n) in enumerate(zip(SITES, n_test)):
        out[site] = {
            owner: site_cell(site, *_scores(10 * i + j, n), n_boot=200).to_metrics()
            for j, owner in enumerate(("SRV_FL_global_model.pt", "site-1", "site-2"))
        }
    return out


def test_a_site_cell_is_its_auc_with_the_bootstrap_interval_and_reads_back_from_its_metrics():
    labels, scores = _scores(0)

    cell = site_cell("site-1", labels, scores, n_boot=300, seed=4)
    metrics = cell.to_metrics()

    assert cell.auc == bootstrap_auc(labels, scores, n_boot=300, seed=4)
    assert cell.n_test == 60 and metrics["data_site"] == "site-1"
    assert set(metrics) == set(SiteCell.METRIC_KEYS)  # no label or per-image score travels
    assert SiteCell.from_metrics(metrics, "cell") == cell


def test_the_matrix_has_a_row_per_model_and_a_column_per_site_in_report_order():
    results = _results()

    matrix, missing = cross_site_matrix(results, SITES)

    assert matrix.models == ("global", "site-1 local", "site-2 local") and matrix.sites == SITES
    assert matrix.auc_array().shape == (3, 2) and matrix.n_test == (60, 40) and missing == {}
    assert matrix.cell("site-2 local", "site-1").estimate == results["site-1"]["site-2"]["auc"]
    assert [model_label(o) for o in ("SRV_best_FL_global_model.pt", "SRV_global_model.pt", "site-3")] == [
        "global (best round)",
        "global",
        "site-3 local",
    ]


def test_a_cell_computed_on_another_sites_data_is_refused():
    results = _results()
    results["site-1"]["site-2"] = {**results["site-1"]["site-2"], "data_site": "site-2"}

    with pytest.raises(InputError) as err:
        cross_site_matrix(results, SITES)

    assert str(err.value).startswith("site-1's cell for model site-2 local: got \"computed on site-2's test data\"")
    assert "a site may only send cells computed on its own test data" in str(err.value)


def test_cells_only_count_from_the_consortiums_sites_keyed_by_their_authenticated_names():
    results = _results()
    results["site-1.site-2"] = results.pop("site-2")  # a sub-result FLARE files under the sender's prefix

    with pytest.raises(InputError, match=r"cross-site senders: got \['site-1.site-2'\]; only the hospitals"):
        cross_site_matrix(results, SITES)


def test_one_site_scores_every_model_on_one_test_set():
    results = _results()
    results["site-2"]["site-1"] = site_cell("site-2", *_scores(7, 30), n_boot=200).to_metrics()

    with pytest.raises(InputError, match=r"site-2's cell for model site-1 local: got '30 test images'"):
        cross_site_matrix(results, SITES)


@pytest.mark.parametrize(
    "change,rule",
    [
        ({"auc": 1.2}, "0 <= low <= auc <= high <= 1"),
        ({"auc_ci_low": 0.99}, "0 <= low <= auc <= high <= 1"),
        ({"n_test": 0}, "n_test >= 1"),
        ({"auc": "high"}, "values must be numbers"),
    ],
)
def test_a_malformed_cell_is_refused_with_the_rule(change, rule):
    metrics = {**site_cell("site-1", *_scores(1), n_boot=200).to_metrics(), **change}

    with pytest.raises(InputError, match="cell of site-1") as err:
        SiteCell.from_metrics(metrics, "cell of site-1")
    assert rule in str(err.value)


def test_a_model_some_site_did_not_score_is_left_out_and_named():
    results = _results()
    del results["site-2"]["site-1"]  # site-2 failed to score site-1's model: FLARE records no cell
    results["site-1"]["site-2"] = {}  # or an empty one

    matrix, missing = cross_site_matrix(results, SITES)

    assert matrix.models == ("global",)
    assert missing == {"site-1 local": ["site-2"], "site-2 local": ["site-1"]}
    assert complete_models({"a": {"m": {"auc": 1}}}, ["a", "b"]) == ((), {"m": ["b"]})


def test_matrix_from_cells_needs_exactly_the_named_sites():
    results = _results()

    with pytest.raises(InputError, match=r"cross-site senders: got \['site-1', 'site-2'\]; exactly the hospitals"):
        matrix_from_cells(results, sites=("site-1", "site-2", "site-3"), models=("SRV_FL_global_model.pt",))


def test_the_evaluations_seconds_are_read_from_the_server_log(tmp_path):
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "log.txt").write_text(
        "2026-01-01 10:00:00,000 - FedAvg - INFO - [wf=controller] - Finished FedAvg.\n"
        "2026-01-01 10:00:01,500 - CrossSiteModelEval - INFO - [wf=cross_site_eval] - Beginning model validation\n"
        "2026-01-01 10:00:05,000 - ServerRunner - INFO - [wf=cross_site_eval] - END_RUN fired\n"
        "2026-01-01 10:00:09,000 - SimulatorServer - INFO - server off\n"
    )

    assert cross_site_seconds(tmp_path) == 3.5
    assert cross_site_seconds(tmp_path / "server" / "nothing") is None
