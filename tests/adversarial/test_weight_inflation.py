"""A hospital that lies about its sample count must not outweigh the others.

One of five hospitals sends a sign-flipped update of ordinary norm and claims 100x its
images. The attack is played against the real FLARE aggregator built from the exported
job folders (jobs/cxr_fedavg: FedAvg with the norm and direction screens; jobs/cxr_robust:
trimmed mean), fed real FLModels, with the consortium's declared counts read from a server kit that
``provision`` made from site_configs; and against the SCAFFOLD controller's control
average and the HE controller's announced weights. The bound is tested with the direction
screen off (it would reject the negated update before any weight counts; see
test_direction_screen.py), then the default job as exported.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from flare_messages import ClientEngine
from hospital_fl.aggregation.weights import DECLARED_IMAGES_FILE, bounded_weights
from hospital_fl.flare.aggregator import HISTORY_FILE, UpdateAggregator
from hospital_fl.flare.controllers import RoundPolicyScaffold
from hospital_fl.flare.he import EncryptedFedAvg, EncryptedSumAggregator
from hospital_fl.flare.kits.provision import provision
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants

ROOT = Path(__file__).resolve().parents[2]
SITES = ["hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e"]
COUNTS = [300, 250, 200, 350, 280]  # what each hospital really trains on
ATTACKER = 0


def _fl_ctx(root: Path) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, ClientEngine(root), private=True, sticky=False)
    return ctx


def _job_aggregator(job: str, **changes) -> UpdateAggregator:
    """The UpdateAggregator as the committed job folder configures it (``changes``: to its rule)."""
    config = json.loads((ROOT / "jobs" / job / "app" / "config" / "config_fed_server.json").read_text())

    def find(node):
        if isinstance(node, dict):
            if node.get("path") == "hospital_fl.flare.aggregator.UpdateAggregator":
                return node.get("args", {})
            node = list(node.values())
        if isinstance(node, list):
            return next((a for a in map(find, node) if a is not None), None)
        return None

    args = find(config)
    return UpdateAggregator(**{**args, "aggregation": {**args["aggregation"], **changes}})


def _round(claims, flip=True, seed=0):
    """Five honest updates along one direction (+ noise); the attacker's negated when ``flip``."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(2000).astype(np.float32)
    direction /= np.linalg.norm(direction)
    updates = [direction + 0.3 * rng.standard_normal(2000).astype(np.float32) / np.sqrt(2000) for _ in SITES]
    if flip:
        updates[ATTACKER] = -updates[ATTACKER]  # same norm as an honest update: the norm screen passes it
    models = [
        FLModel(
            params_type=ParamsType.DIFF,
            params={"w": u},
            metrics={"val_auc": 0.8},
            current_round=0,
            meta={"client_name": site, "n_samples": n},
        )
        for site, u, n in zip(SITES, updates, claims)
    ]
    return models, direction


def _inflated():
    return [n * 100 if i == ATTACKER else n for i, n in enumerate(COUNTS)]


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def server_kit(tmp_path_factory):
    """A server kit provisioned from site_configs with the five hospitals' declared counts."""
    pytest.importorskip("tenseal")  # the example consortium turns HE on
    tmp = tmp_path_factory.mktemp("inflate")
    configs = tmp / "site_configs"
    shutil.copytree(ROOT / "site_configs", configs)
    template = yaml.safe_load((configs / "hospitals" / "hospital-a.yaml").read_text())
    for path in (configs / "hospitals").glob("*.yaml"):
        path.unlink()
    for site, n in zip(SITES, COUNTS):
        org = site.replace("-", "_")
        data = {**template, "name": site, "org": org, "declared_images": n, "data_root": f"/data/{site}"}
        (configs / "hospitals" / f"{site}.yaml").write_text(yaml.safe_dump(data))
    return provision(configs, tmp / "out")


def test_provisioning_carries_the_declared_counts_into_the_server_kit_and_each_hospital_kit(server_kit):
    kits = {k.name: k.path for k in server_kit.kits}
    server = next(k.path for k in server_kit.kits if k.type == "server")

    assert json.loads((server / "local" / DECLARED_IMAGES_FILE).read_text()) == dict(zip(SITES, COUNTS))
    for site, n in zip(SITES, COUNTS):
        assert json.loads((kits[site] / "local" / DECLARED_IMAGES_FILE).read_text()) == {site: n}


def test_inflated_flipped_update_is_held_to_the_declared_count_on_the_default_job(server_kit, tmp_path):
    server = next(k.path for k in server_kit.kits if k.type == "server")
    # The weights as they were: the claim itself (and no direction screen).
    unbounded = _job_aggregator("cxr_fedavg", claim_cap=None, min_cosine=None)
    bounded = _job_aggregator("cxr_fedavg", min_cosine=None)
    bounded.handle_event(EventType.START_RUN, _fl_ctx(server))  # reads the kit's declared counts
    assert bounded.declared == dict(zip(SITES, COUNTS))

    models, direction = _round(_inflated())
    for m in models:
        bounded.accept_model(m)
    result = bounded.aggregate_model()

    honest = np.mean([m.params["w"] for i, m in enumerate(models) if i != ATTACKER], axis=0)
    # Weighted by the declared counts, the liar has 300/1380 of the say, not 30000/31080.
    expected = sum(n * m.params["w"] for n, m in zip(COUNTS, models)) / sum(COUNTS)
    np.testing.assert_allclose(result.params["w"], expected, rtol=1e-5, atol=1e-7)
    assert _cos(result.params["w"], direction) > 0.5 and _cos(result.params["w"], honest) > 0.5
    entry = bounded.history[0]
    liar = next(s for s in entry["sites"] if s["site"] == SITES[ATTACKER])
    assert liar["accepted"]  # its norm is ordinary: the screen cannot see the lie, the bound can
    assert (liar["claimed_samples"], liar["allowed_samples"], liar["weight_basis"]) == (30000, 300, "declared")
    assert entry["aggregation"]["weight_clips"] == [
        {"site": SITES[ATTACKER], "claimed": 30000.0, "allowed": 300.0, "basis": "declared"}
    ]
    # The history file a job result carries records the clip.
    ctx = _fl_ctx(server)
    ctx.set_prop(ReservedKey.RUN_NUM, "job-1", private=False, sticky=False)
    (server / "job-1").mkdir(exist_ok=True)
    bounded.handle_event(EventType.END_RUN, ctx)
    saved = json.loads((server / "job-1" / HISTORY_FILE).read_text())
    assert saved[0]["aggregation"]["weight_clips"][0]["claimed"] == 30000

    # Today's weights (the claim itself) would have let the liar flip the model.
    for m in _round(_inflated())[0]:
        unbounded.accept_model(m)
    assert _cos(unbounded.aggregate_model().params["w"], direction) < -0.5

    # The default job as exported: the direction screen rejects the liar outright, and the
    # bound still records its claim.
    default = _job_aggregator("cxr_fedavg")
    default.handle_event(EventType.START_RUN, _fl_ctx(server))
    for m in models:
        default.accept_model(m)
    result = default.aggregate_model()
    liar = next(s for s in default.history[0]["sites"] if s["site"] == SITES[ATTACKER])
    assert not liar["accepted"] and "cosine similarity" in liar["reason"] and liar["update_cosine"] < 0
    assert liar["allowed_samples"] == 300
    expected = sum(n * m.params["w"] for n, m in list(zip(COUNTS, models))[1:]) / sum(COUNTS[1:])
    np.testing.assert_allclose(result.params["w"], expected, rtol=1e-5, atol=1e-7)


def test_without_declared_counts_a_claim_is_held_to_k_times_the_median_claim():
    agg = _job_aggregator("cxr_fedavg", min_cosine=None)  # the simulator: no kit, so no declared counts
    models, _ = _round(_inflated())
    for m in models:
        agg.accept_model(m)
    result = agg.aggregate_model()

    k = agg.rule.claim_cap
    allowed = k * float(np.median(_inflated()))
    weights = [allowed, *COUNTS[1:]]
    expected = sum(w * m.params["w"] for w, m in zip(weights, models)) / sum(weights)
    np.testing.assert_allclose(result.params["w"], expected, rtol=1e-5, atol=1e-7)
    clips = agg.history[0]["aggregation"]["weight_clips"]
    assert clips == [{"site": SITES[ATTACKER], "claimed": 30000.0, "allowed": allowed, "basis": "median"}]


def test_an_inflated_count_with_an_honest_update_changes_nothing_but_the_weight(server_kit):
    server = next(k.path for k in server_kit.kits if k.type == "server")
    agg = _job_aggregator("cxr_fedavg")
    agg.handle_event(EventType.START_RUN, _fl_ctx(server))
    models, _ = _round(_inflated(), flip=False)
    for m in models:
        agg.accept_model(m)
    result = agg.aggregate_model()

    expected = sum(n * m.params["w"] for n, m in zip(COUNTS, models)) / sum(COUNTS)
    np.testing.assert_allclose(result.params["w"], expected, rtol=1e-5, atol=1e-7)
    assert all(s["accepted"] for s in agg.history[0]["sites"])
    assert agg.history[0]["aggregation"]["weight_clips"][0]["allowed"] == 300
    assert result.metrics["val_auc"] == pytest.approx(0.8)  # metrics averaged with the bounded weights


@pytest.mark.parametrize("flip", [True, False])
def test_cxr_robust_rule_ignores_the_claim_and_records_the_clip(server_kit, flip):
    server = next(k.path for k in server_kit.kits if k.type == "server")
    agg = _job_aggregator("cxr_robust")
    assert agg.rule.rule == "trimmed_mean"
    agg.handle_event(EventType.START_RUN, _fl_ctx(server))
    models, direction = _round(_inflated(), flip=flip)
    for m in models:
        agg.accept_model(m)
    result = agg.aggregate_model()

    # A negated update is left out by the direction screen before the rule runs.
    kept = [m for i, m in enumerate(models) if not (flip and i == ATTACKER)]
    assert [s["accepted"] for s in agg.history[0]["sites"]] == [not (flip and i == ATTACKER) for i in range(5)]
    stacked = np.sort(np.stack([m.params["w"] for m in kept]), axis=0)
    np.testing.assert_allclose(result.params["w"], stacked[1:-1].mean(axis=0), rtol=1e-5, atol=1e-7)
    assert _cos(result.params["w"], direction) > 0.9
    assert agg.history[0]["aggregation"]["weight_clips"][0]["basis"] == "declared"


def test_multi_krum_and_norm_bounded_average_with_the_bounded_weights():
    for rule in ("multi_krum", "norm_bounded"):
        agg = UpdateAggregator(aggregation={"rule": rule, "claim_cap": 2.0})
        models, _ = _round(_inflated(), flip=False)
        for m in models:
            agg.accept_model(m)
        result = agg.aggregate_model()
        chosen = [SITES.index(s) for s in agg.history[0]["aggregation"].get("selected", SITES)]
        weights, _ = bounded_weights(_inflated(), None, 2.0)
        w = np.asarray([weights[i] for i in chosen])
        stacked = np.stack([models[i].params["w"] for i in chosen])
        if rule == "norm_bounded":  # every update scaled to at most the round's median norm
            bound = np.median([np.linalg.norm(m.params["w"]) for m in models])
            stacked = stacked * np.minimum(1.0, bound / np.linalg.norm(stacked, axis=1))[:, None]
        np.testing.assert_allclose(result.params["w"], (w / w.sum()) @ stacked, rtol=1e-4, atol=1e-6)


def test_scaffold_control_changes_are_screened_and_bounded_like_updates():
    agg = UpdateAggregator()
    ctl = RoundPolicyScaffold(num_clients=5, num_rounds=1, aggregator=agg)
    models, _ = _round(_inflated(), flip=False)
    rng = np.random.default_rng(1)
    controls = [{"w": rng.standard_normal(2000).astype(np.float32) * 0.01} for _ in SITES]
    controls[2] = {"w": np.full(2000, np.nan, np.float32)}  # a NaN control change
    controls[3] = {"w": controls[3]["w"] * 1000}  # a huge one
    for m, c in zip(models, controls):
        m.meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = c
    model = ctl.aggregate(models)

    sites = {s["site"]: s for s in agg.history[0]["sites"]}
    assert "NaN" in sites[SITES[2]]["control_reason"]
    assert "exceeds 10 x the round's median update norm" in sites[SITES[3]]["control_reason"]
    # The bound takes the median over every well-formed claim (the norm-screened one included).
    valid = [0, 1, 3, 4]
    weights = dict(zip(valid, bounded_weights([_inflated()[i] for i in valid], None, agg.rule.claim_cap)[0]))
    kept = [0, 1, 4]
    expected = sum(weights[i] * controls[i]["w"] for i in kept) / sum(weights[i] for i in kept)
    np.testing.assert_allclose(model.meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF]["w"], expected, rtol=1e-5, atol=1e-8)
    assert np.isfinite(model.meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF]["w"]).all()


def test_he_controller_announces_weights_bounded_by_the_declared_counts(server_kit, tmp_path):
    server = next(k.path for k in server_kit.kits if k.type == "server")
    ctl = EncryptedFedAvg(num_clients=5, num_rounds=1, aggregator=EncryptedSumAggregator())
    ctl.fl_ctx = _fl_ctx(server)
    counts = dict(zip(SITES, _inflated()))

    p = ctl._announced_weights(counts, SITES)

    assert p[SITES[ATTACKER]] == pytest.approx(300 / sum(COUNTS))
    assert sum(p.values()) == pytest.approx(1.0)
    assert ctl.weight_clips == [{"site": SITES[ATTACKER], "claimed": 30000.0, "allowed": 300.0, "basis": "declared"}]
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    ctl.fl_ctx = _fl_ctx(tmp_path)  # a workspace without declared counts: k x the median claim
    p = ctl._announced_weights(counts, SITES)
    assert p[SITES[ATTACKER]] < 0.5


def test_he_round_rejects_a_text_metric_and_goes_on():
    """The HE aggregator averages the sites' plaintext metrics itself: a text metric must not stop it."""
    tenseal = pytest.importorskip("tenseal")
    del tenseal
    from hospital_fl.privacy import he
    from hospital_fl.privacy.he_params import CKKSParams

    params = CKKSParams()
    site_ctx = he.make_context(params)
    agg = EncryptedSumAggregator()
    agg.context = he.context_from_bytes(he.server_context_bytes(site_ctx), role="server")
    agg.key_id = he.context_fingerprint(site_ctx)
    rng = np.random.default_rng(0)
    reference = {"w": rng.normal(0, 0.1, 64).astype(np.float32)}
    lies = {SITES[1]: "high", SITES[2]: float("nan")}
    for site, n in zip(SITES, COUNTS):
        update = {"w": (reference["w"] + rng.normal(0, 0.01, 64)).astype(np.float32)}
        payload = he.encrypt_update(update, reference, n / sum(COUNTS), site_ctx, params, workers=1)
        agg.accept_model(
            FLModel(
                params_type=ParamsType.FULL,
                params=payload,
                metrics={"val_auc": lies.get(site, 0.8)},
                current_round=0,
                meta={"client_name": site, "n_samples": n},
            )
        )
    result = agg.aggregate_model()

    sites = {s["site"]: s for s in agg.history[0]["sites"]}
    assert "metric 'val_auc' is a str ('high')" in sites[SITES[1]]["reason"]
    assert "metric 'val_auc' is nan" in sites[SITES[2]]["reason"]
    assert not sites[SITES[1]]["accepted"] and not sites[SITES[2]]["accepted"]
    assert result.meta["hospital_fl_he_sites"] == [SITES[0], SITES[3], SITES[4]]
    assert result.metrics == {"val_auc": pytest.approx(0.8)}
