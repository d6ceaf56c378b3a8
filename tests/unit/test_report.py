import numpy as np
from hospital_fl.evaluation.report import build_report, outlier_sites, render_markdown, round_curve
from hospital_fl.evaluation.scoring import ModelScores

CONTRACT_KEYS = {
    "task",
    "dataset",
    "rounds",
    "sites",
    "federated",
    "centralized",
    "local_only",
    "timing",
    "communication",
    "privacy",
    "flags",
}


def test_outlier_site_is_flagged_among_five_sites_only_when_far_below_the_others():
    aucs = {"a": 0.95, "b": 0.96, "c": 0.94, "d": 0.955}

    assert outlier_sites({**aucs, "e": 0.94}) == []
    assert outlier_sites({**aucs, "weak": 0.80}) == ["weak"]
    # statistically far below near-perfect sites, but clinically no difference
    assert outlier_sites({"a": 0.996, "b": 1.0, "c": 1.0, "d": 1.0, "e": 0.990}) == []


def test_round_curve_weights_sites_by_samples_and_skips_rejected():
    history = [
        {
            "round": 0,
            "sites": [
                {"accepted": True, "n_samples": 300, "metrics": {"test_auc": 0.9}},
                {"accepted": True, "n_samples": 100, "metrics": {"test_auc": 0.5}},
                {"accepted": False, "n_samples": 100, "metrics": {"test_auc": 0.0}},
            ],
        }
    ]

    assert round_curve(history) == [{"round": 0, "site_weighted_test_auc": 0.8}]


def _scores(data, quality, rng):
    def probs(labels):
        return 1 / (1 + np.exp(-(quality * (labels - 0.5) + rng.normal(0, 1, len(labels)))))

    return ModelScores(probs(data.held_out_test.labels), {s.name: probs(s.test.labels) for s in data.sites})


def test_report_carries_the_contract_keys_and_ranks_models(federated_data):
    rng = np.random.default_rng(0)
    history = [
        {
            "round": 0,
            "sites": [
                {
                    "site": s.name,
                    "accepted": True,
                    "n_samples": len(s.train),
                    "train_seconds": 1.0,
                    "payload_bytes": 1000 + 100 * i,
                    "uncompressed_bytes": 4000,
                    "metrics": {"test_auc": 0.9},
                }
                for i, s in enumerate(federated_data.sites)
            ],
        }
    ]

    report = build_report(
        task="pneumonia",
        mode="simulator",
        rounds=1,
        data=federated_data,
        federated=_scores(federated_data, 6, rng),
        centralized=_scores(federated_data, 6, rng),
        local_only={s.name: _scores(federated_data, 1, rng) for s in federated_data.sites},
        history=history,
        wall_seconds=10.0,
        settings={"uplink": "int8"},
    )

    assert CONTRACT_KEYS <= set(report)
    assert report["timing"]["overhead_ratio"] == 10.0  # wall / slowest site per round (1 s)
    assert report["timing"]["client_train_seconds"] == 5.0
    comm = report["communication"]
    assert comm["bytes_per_round_per_site"] == 1200 and comm["uncompressed_bytes_per_round_per_site"] == 4000
    assert comm["per_site_bytes_per_round"] == {s.name: 1000 + 100 * i for i, s in enumerate(federated_data.sites)}
    assert comm["uplink"] == "int8" and "(uplink int8; uncompressed 0.004 MB)" in render_markdown(report)
    assert report["federated"]["auc"] > report["local_only"]["best_auc"]
    assert report["federated"]["auc_ci95"][0] < report["federated"]["auc"] < report["federated"]["auc_ci95"][1]
    assert {"name", "n_train", "n_test", "positive_fraction", "auc", "auc_local_only"} <= set(report["sites"][0])
    assert report["privacy"] == {s.name: None for s in federated_data.sites}
    assert report["central_dp"] is None and "privacy: none applied" in render_markdown(report)
    assert any("local test holds only" in f for f in report["flags"])  # site-3 has 43 test images
    assert "| site-1 |" in render_markdown(report)


def test_privacy_by_site_reads_each_sites_last_accepted_report():
    from hospital_fl.evaluation.report import privacy_by_site

    meta = {"mechanism": "sample", "delta": 1e-5, "training_noise_multiplier": 0.9, "sample_rate": 0.1}
    history = [
        {"round": 0, "sites": [{"site": "a", "accepted": True, "privacy": {**meta, "site_epsilon_so_far": 2.0}}]},
        {
            "round": 1,
            "sites": [
                {"site": "a", "accepted": True, "privacy": {**meta, "site_epsilon_so_far": 3.5}},
                {"site": "b", "accepted": True, "privacy": None},
            ],
        },
    ]
    out = privacy_by_site(history)
    assert out["a"]["epsilon"] == 3.5 and out["a"]["mechanism"] == "sample" and out["b"] is None
