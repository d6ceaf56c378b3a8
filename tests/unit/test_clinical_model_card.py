import base64
from html.parser import HTMLParser

import numpy as np
import pytest
from hospital_fl.data.pneumoniamnist import EMBEDDED_SHA256
from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical.calibration import plot_reliability, reliability_diagram
from hospital_fl.evaluation.clinical.model_card import (
    model_card_from_report,
    render_model_card_html,
    render_model_card_markdown,
    write_model_card,
)
from hospital_fl.evaluation.report import build_report
from hospital_fl.evaluation.scoring import ModelScores


def _report(data):
    rng = np.random.default_rng(0)

    def scores(quality):
        def probs(labels):
            return 1 / (1 + np.exp(-(quality * (labels - 0.5) + rng.normal(0, 1, len(labels)))))

        return ModelScores(probs(data.held_out_test.labels), {s.name: probs(s.test.labels) for s in data.sites})

    dp = {"mechanism": "dp_sgd", "delta": 1e-5, "epsilon_bound": 4.5}
    history = [
        {
            "round": 0,
            "sites": [
                {
                    "site": s.name,
                    "accepted": True,
                    "n_samples": len(s.train),
                    "train_seconds": 1.0,
                    "payload_bytes": 1000,
                    "metrics": {"test_auc": 0.9},
                    "privacy": dp if s.name == "site-2" else None,
                }
                for s in data.sites
            ],
        }
    ]
    return build_report(
        task="pneumonia",
        mode="simulator",
        rounds=1,
        data=data,
        federated=scores(6),
        centralized=scores(6),
        local_only={s.name: scores(1) for s in data.sites},
        history=history,
        wall_seconds=10.0,
        settings={"algorithm": "fedavg"},
    )


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [(tag, k, v) for k, v in attrs if k in ("src", "href", "srcset", "action", "data", "poster")]


@pytest.fixture(scope="module")
def report(federated_data):
    return _report(federated_data)


def test_card_fields_come_from_the_report_and_the_provenance(report, tmp_path):
    card = model_card_from_report(
        report,
        job="cxr_fedavg",
        provenance={"site-1": {"manifest_sha256": "ab" * 32, "consent_registry": "registry-2024.csv"}},
        site_auc_ci95={"site-1": (0.91, 0.97)},
        known_failure_modes=("Misses subtle opacities behind the heart.",),
        dataset_sha256=EMBEDDED_SHA256,
    )

    assert card.title == "Federated pneumonia classifier" and card.job == "cxr_fedavg" and card.algorithm == "fedavg"
    assert [h.name for h in card.hospitals] == [s["name"] for s in report["sites"]]
    site1 = card.hospitals[0]
    assert (site1.n_train, site1.n_test) == (report["sites"][0]["n_train"], report["sites"][0]["n_test"])
    assert site1.manifest_sha256 == "ab" * 32 and site1.consent_registry == "registry-2024.csv"
    assert card.hospitals[1].manifest_sha256 is None
    privacy = {p.site: p for p in card.privacy}
    assert privacy["site-2"].mechanism == "dp_sgd" and privacy["site-2"].epsilon == 4.5
    assert privacy["site-1"].mechanism is None
    assert card.site_results[0].auc_ci95 == (0.91, 0.97) and card.site_results[1].auc_ci95 is None
    assert card.federated_auc_ci95 == tuple(report["federated"]["auc_ci95"])
    assert card.failure_modes[-1] == "Misses subtle opacities behind the heart."
    assert any("local test holds only" in f for f in card.failure_modes)  # a report flag

    md = render_model_card_markdown(card)
    assert md.startswith("# Model card: Federated pneumonia classifier")
    assert f"| site-1 | {site1.n_train} | {site1.n_test} |" in md and "registry-2024.csv" in md
    assert "| site-2 | dp_sgd, epsilon 4.50 (delta 1e-05) |" in md
    assert f"({0.91:.3f}-{0.97:.3f})" in md and EMBEDDED_SHA256 in md
    md_path, html_path = write_model_card(card, tmp_path)
    assert md_path.read_text() == md and html_path.read_text().startswith("<!DOCTYPE html>")


def test_html_is_self_contained_embeds_every_plot_and_escapes_text(report, tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.random(200)
    plot = plot_reliability(
        {"federated": reliability_diagram((rng.random(200) < probs).astype(int), probs)}, tmp_path / "cal.png"
    )
    card = model_card_from_report(
        report,
        plots={"Calibration": plot, "Calibration again": plot},
        known_failure_modes=('<script src="https://x.example/a.js"></script> & <a href="http://x">',),
    )

    page = render_model_card_html(card)

    links = _Links()
    links.feed(page)
    assert [(t, k) for t, k, _ in links.refs] == [("img", "src"), ("img", "src")]
    for _, _, value in links.refs:
        assert value.startswith("data:image/png;base64,")
        assert base64.b64decode(value.split(",", 1)[1]) == plot.read_bytes()
    assert "<script" not in page and "&lt;script src=&quot;https://x.example/a.js&quot;&gt;" in page
    assert "://" not in page.replace("https://x.example", "").replace("http://x", "")
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_missing_report_keys_and_unknown_sites_are_named(report, tmp_path):
    broken = {k: v for k, v in report.items() if k != "centralized"}
    with pytest.raises(
        InputError, match=r"report\['centralized'\]: got 'missing'; a model card is built from report.json"
    ):
        model_card_from_report(broken)
    with pytest.raises(InputError, match=r"provenance: got \['hospital-x'\]; sites must be among the report's"):
        model_card_from_report(report, provenance={"hospital-x": {"manifest_sha256": "00"}})
    with pytest.raises(InputError, match="plot 'ROC': got .*the PNG must exist"):
        model_card_from_report(report, plots={"ROC": tmp_path / "absent.png"})
