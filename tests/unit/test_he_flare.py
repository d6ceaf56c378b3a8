"""The HE job's FLARE pieces on real TenSEAL contexts: what the server refuses, what a site refuses."""

from __future__ import annotations

import numpy as np
import pytest
from flare_messages import round_task, site_context
from hospital_fl.errors import InputError
from hospital_fl.flare import he as flare_he
from hospital_fl.privacy import he
from hospital_fl.privacy.he_params import CKKSParams
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

PARAMS = CKKSParams()


@pytest.fixture(scope="module")
def consortium():
    site = he.make_context(PARAMS)
    server = he.context_from_bytes(he.server_context_bytes(site), role="server")
    return site, server


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(0, 0.1, (8, 1, 3, 3)).astype(np.float32), "fc.bias": rng.normal(0, 0.1, 2)}


def _result(site: str, params, rnd: int = 0) -> FLModel:
    return FLModel(
        params_type=ParamsType.FULL,
        params=params,
        current_round=rnd,
        metrics={"val_auc": 0.5},
        meta={"client_name": site, "n_samples": 10},
    )


def test_server_refuses_plaintext_and_another_key_and_sums_the_rest(consortium):
    site_ctx, server_ctx = consortium
    foreign = he.make_context(PARAMS)  # another consortium's kit
    reference = _weights(0)
    updates = {name: _weights(i + 1) for i, name in enumerate(["site-1", "site-2", "site-3"])}
    aggregator = flare_he.EncryptedSumAggregator()
    aggregator.context = server_ctx
    aggregator.accept_model(_result("site-1", he.encrypt_update(updates["site-1"], reference, 0.25, site_ctx, PARAMS)))
    aggregator.accept_model(_result("site-2", he.encrypt_update(updates["site-2"], reference, 0.25, site_ctx, PARAMS)))
    aggregator.accept_model(_result("site-3", he.encrypt_update(updates["site-3"], reference, 0.25, foreign, PARAMS)))
    aggregator.accept_model(_result("site-4", {k: v.copy() for k, v in updates["site-1"].items()}))

    summed = aggregator.aggregate_model()

    sites = {s["site"]: s for s in aggregator.history[-1]["sites"]}
    assert sites["site-1"]["accepted"] and sites["site-2"]["accepted"]
    assert not sites["site-3"]["accepted"] and "another key" in sites["site-3"]["reason"]
    assert not sites["site-4"]["accepted"] and "plaintext update in an encrypted round" in sites["site-4"]["reason"]
    assert summed.params["sites"] == 2
    mean, info = he.decrypt_update(summed.params, site_ctx)
    assert info["decoded_weight"] == pytest.approx(0.5, abs=1e-4)  # a round without two sites
    # Fixed-point step: frame 2**2 (floor 1, headroom 4x) over 2**16, per site, over the 0.5 decoded.
    step = 2.0**2 / 2 ** PARAMS.packing().magnitude_bits
    for k in reference:
        expected = (updates["site-1"][k] + updates["site-2"][k]) / 2
        np.testing.assert_allclose(mean[k], expected, atol=2 * step / 0.5)

    # From now on the hospitals' key is pinned: the foreign site is refused on arrival.
    aggregator.accept_model(_result("site-3", he.encrypt_update(updates["site-3"], reference, 0.5, foreign, PARAMS), 1))
    assert "different context" in aggregator._sites[-1]["reason"]


def test_a_round_of_only_refused_updates_fails_loudly(consortium):
    _, server_ctx = consortium
    aggregator = flare_he.EncryptedSumAggregator()
    aggregator.context = server_ctx
    aggregator.accept_model(_result("site-1", _weights(1)))
    with pytest.raises(RuntimeError, match="every site's update was rejected"):
        aggregator.aggregate_model()


def _fl_ctx(job: str) -> FLContext:
    return site_context("site-1", job)


def test_site_refuses_a_plaintext_model_after_the_initial_one(consortium, monkeypatch):
    site_ctx, _ = consortium
    monkeypatch.setitem(flare_he._SITE_CONTEXTS, "job-a", site_ctx)
    decrypt, encrypt = flare_he.DecryptGlobalModel(), flare_he.EncryptUpdate(ckks=PARAMS.to_json())
    fl_ctx = _fl_ctx("job-a")
    initial = _weights(0)
    meta = {flare_he.PLAINTEXT_INITIAL_KEY: True, flare_he.WEIGHTS_KEY: {"site-1": 0.5}}

    received = decrypt.process_dxo(DXO(DataKind.WEIGHTS, data=initial, meta=meta), round_task(0), fl_ctx)
    assert flare_he.PLAINTEXT_INITIAL_KEY not in received.meta
    # The executor sends a difference; the filter sends the full weights times 0.5, encrypted.
    diff = {k: np.full_like(v, 0.01) for k, v in initial.items()}
    sent = encrypt.process_dxo(DXO(DataKind.WEIGHT_DIFF, data=diff), Shareable(), fl_ctx)
    assert sent.data_kind == DataKind.WEIGHTS and he.is_encrypted(sent.data)
    assert sent.data["weight"] == 0.5
    back, _ = he.decrypt_update(sent.data, site_ctx)
    np.testing.assert_allclose(back["conv.weight"], initial["conv.weight"] + 0.01, atol=1e-4)

    for late in ({}, {flare_he.PLAINTEXT_INITIAL_KEY: True}):
        with pytest.raises(InputError, match="only the first model of the job .* may arrive in plaintext"):
            decrypt.process_dxo(DXO(DataKind.WEIGHTS, data=initial, meta=late), round_task(1), fl_ctx)


def test_encrypted_global_model_file_round_trips_and_refuses_other_files(consortium, tmp_path):
    site_ctx, _ = consortium
    payload = he.encrypt_update(_weights(3), _weights(3), 1.0, site_ctx, PARAMS)
    path = tmp_path / flare_he.CIPHERTEXT_MODEL_FILE
    flare_he.save_payload(payload, path)
    assert flare_he.load_payload(path) == payload
    (tmp_path / "other.pt").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(InputError, match="encrypted model file"):
        flare_he.load_payload(tmp_path / "other.pt")
