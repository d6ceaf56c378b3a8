import numpy as np
import pytest
from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical.cross_site import (
    SiteScores,
    build_cross_site_matrix,
    cross_site_markdown,
    plot_cross_site,
    validate_submissions,
)
from hospital_fl.training.metrics import rank_auc

SITES = ("site-1", "site-2", "site-3")
MODELS = ("global", "local site-1", "local site-2", "local site-3")


def _submissions(rng, n=80):
    """Each site scores every model on its own test data: the global model separates the
    classes everywhere, a local model well only at its own site."""
    out = {}
    for site in SITES:
        labels = np.array([0, 1] * (n // 2))
        out[site] = {}
        for model in MODELS:
            strength = 3.0 if model == "global" or model.endswith(site) else 0.3
            scores = 1 / (1 + np.exp(-(strength * (labels - 0.5) + rng.normal(0, 1, n))))
            out[site][model] = (labels, scores)
    return out


def test_matrix_cells_are_each_sites_auc_with_a_ci_and_render_as_table_and_heatmap(tmp_path):
    subs = _submissions(np.random.default_rng(0))

    matrix = build_cross_site_matrix(subs, sites=SITES, n_boot=200)

    assert matrix.models == MODELS and matrix.sites == SITES and matrix.n_test == (80, 80, 80)
    for model in MODELS:
        for site in SITES:
            cell = matrix.cell(model, site)
            assert cell.estimate == rank_auc(subs[site][model][1], subs[site][model][0])
            assert cell.low <= cell.estimate <= cell.high
    aucs = matrix.auc_array()
    # each local model is best on its own hospital's data, the global model strong everywhere
    for j, site in enumerate(SITES):
        assert aucs[MODELS.index(f"local {site}"), j] > aucs[MODELS.index(f"local {SITES[j - 1]}"), j]
    assert aucs[0].min() > 0.85
    table = cross_site_markdown(matrix)
    assert table.splitlines()[0] == "| model \\ test data | site-1 (n=80) | site-2 (n=80) | site-3 (n=80) |"
    c = matrix.cell("global", "site-2")
    assert "| global | " in table and f"{c.estimate:.3f} ({c.low:.3f}-{c.high:.3f})" in table
    assert matrix.to_dict()["auc"][0][1] == c.estimate
    png = plot_cross_site(matrix, tmp_path / "cross_site.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_site_cannot_submit_scores_for_another_sites_data():
    subs = _submissions(np.random.default_rng(1))
    labels, scores = subs["site-2"]["global"]
    subs["site-1"]["global"] = SiteScores("site-2", labels, scores)

    with pytest.raises(
        InputError,
        match="site-1's scores for model global: got \"computed on site-2's test data\"; a site may only submit "
        "scores computed on its own test data. Fix: let site-2 score the model",
    ):
        build_cross_site_matrix(subs, n_boot=200)
    # naming its own data explicitly is accepted
    subs["site-1"]["global"] = SiteScores("site-1", *_submissions(np.random.default_rng(1))["site-1"]["global"])
    assert validate_submissions(subs)["site-1"]["global"].data_site == "site-1"


def test_models_at_one_site_must_share_its_test_set_and_every_site_scores_every_model():
    subs = _submissions(np.random.default_rng(2))
    labels, scores = subs["site-3"]["local site-1"]
    subs["site-3"]["local site-1"] = (labels[:-2], scores[:-2])
    with pytest.raises(InputError, match="site-3's labels for model local site-1: got '78 labels, 39 positive'"):
        validate_submissions(subs)

    subs = _submissions(np.random.default_rng(2))
    del subs["site-2"]["local site-3"]
    with pytest.raises(InputError, match="models scored by site-2: .*every site must score the same models as site-1"):
        validate_submissions(subs)

    subs = _submissions(np.random.default_rng(2))
    del subs["site-3"]
    with pytest.raises(InputError, match=r"submitting sites: got \['site-1', 'site-2'\]; exactly the hospitals"):
        validate_submissions(subs, sites=SITES)

    subs = _submissions(np.random.default_rng(2))
    subs["site-1"]["global"] = (subs["site-1"]["global"][0], subs["site-1"]["global"][1] * 10 - 5)
    with pytest.raises(InputError, match=r"y_score: got 'range.*probabilities must lie in \[0, 1\]"):
        validate_submissions(subs)
