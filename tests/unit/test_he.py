"""CKKS encryption of model updates with real TenSEAL: the server adds without the secret key."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tenseal as ts
from hospital_fl.errors import InputError
from hospital_fl.privacy.he import (
    CKKSParams,
    add_encrypted,
    client_context_bytes,
    context_fingerprint,
    context_from_bytes,
    decrypt_update,
    encrypt_update,
    is_encrypted,
    load_context,
    make_context,
    payload_nbytes,
    server_context_bytes,
    shutdown_pools,
)
from hospital_fl.privacy.he_packing import Layout

CKKS = CKKSParams()


@pytest.fixture(scope="module")
def kits():
    """One provisioning: the provisioning context, the server's and a hospital's."""
    ctx = make_context(CKKS)
    server = context_from_bytes(server_context_bytes(ctx), role="server")
    client = context_from_bytes(client_context_bytes(ctx), role="client")
    yield ctx, server, client
    shutdown_pools()


@pytest.fixture(scope="module")
def other_client():
    """A hospital context of another provisioning (another key)."""
    return context_from_bytes(client_context_bytes(make_context(CKKS)), role="client")


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "features.conv0.weight": (0.2 * rng.normal(size=(32, 1, 7, 7))).astype(np.float32),
        "features.norm0.running_mean": rng.normal(size=32).astype(np.float32),
        "features.norm0.running_var": (1 + rng.random(32)).astype(np.float32),
        "features.norm0.num_batches_tracked": np.array(50, dtype=np.int64),
        "features.dense.weight": (0.05 * rng.normal(size=(64, 256))).astype(np.float32),
        "class_layers.out.weight": (0.05 * rng.normal(size=(1, 1024))).astype(np.float32),
        "class_layers.out.bias": np.zeros(1, dtype=np.float32),
    }


def _site(reference: dict[str, np.ndarray], rng: np.random.Generator, steps: int) -> dict[str, np.ndarray]:
    return {
        k: (v + 0.02 * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v + steps
        for k, v in reference.items()
    }


@pytest.fixture(scope="module")
def round_of_three(kits):
    _, _, client = kits
    rng = np.random.default_rng(0)
    reference = _model(rng)
    sites = [_site(reference, rng, steps) for steps in (10, 20, 30)]
    sites[1]["features.dense.weight"][0, :8] = np.float32(
        [0.0123, -0.0456, 0.0789, 0.0321, -0.0654, 0.0987, 0.01, 0.02]
    )
    weights = [0.2, 0.5, 0.3]
    payloads = [encrypt_update(s, reference, w, client, CKKS, workers=1) for s, w in zip(sites, weights)]
    return reference, sites, weights, payloads


def test_server_sum_decrypts_to_the_weighted_mean(kits, round_of_three):
    _, server, client = kits
    reference, sites, weights, payloads = round_of_three
    assert not server.has_secret_key()
    assert all(is_encrypted(p) and all(isinstance(c, bytes) for c in p["chunks"]) for p in payloads)
    total = add_encrypted(payloads, server, names=["a", "b", "c"])
    assert total["sites"] == 3 and total["weight"] == pytest.approx(1.0)
    mean, info = decrypt_update(total, client, CKKS)
    assert info["sites"] == 3 and info["decoded_weight"] == pytest.approx(1.0, abs=1e-4)
    assert info["n_chunks"] == len(payloads[0]["chunks"]) and info["bytes"] == payload_nbytes(total)
    layout = Layout.from_json(total["layout"])
    for name, exponent in zip(layout.names, layout.exponents):
        expected = np.average(np.stack([s[name].astype(np.float64) for s in sites]), axis=0, weights=weights)
        assert mean[name].dtype == reference[name].dtype and mean[name].shape == reference[name].shape
        if reference[name].dtype.kind == "f":
            step = math.ldexp(1.0, exponent - CKKS.packing().magnitude_bits)
            assert np.abs(mean[name] - expected).max() <= len(sites) * step, name
    assert mean["features.norm0.num_batches_tracked"] == round(0.2 * 60 + 0.5 * 70 + 0.3 * 80)


def test_ciphertexts_hold_no_plaintext(kits, round_of_three):
    _, server, _ = kits
    _, sites, _, payloads = round_of_three
    total = add_encrypted(payloads, server)
    distinctive = sites[1]["features.dense.weight"][0, :8].astype(np.float32).tobytes()
    for payload in [*payloads, total]:
        assert not any(distinctive in chunk for chunk in payload["chunks"])
        assert not any(distinctive[:16] in chunk for chunk in payload["chunks"])


def test_a_dropped_site_still_gives_a_weighted_mean(kits, round_of_three):
    _, server, client = kits
    _, sites, _, payloads = round_of_three
    mean, info = decrypt_update(add_encrypted(payloads[:2], server), client)
    assert info["decoded_weight"] == pytest.approx(0.7, abs=1e-4)
    expected = (0.2 * sites[0]["class_layers.out.weight"] + 0.5 * sites[1]["class_layers.out.weight"]) / 0.7
    np.testing.assert_allclose(mean["class_layers.out.weight"], expected, atol=1e-4)


def test_declared_weight_must_match_the_decrypted_one(kits, round_of_three):
    _, server, client = kits
    total = add_encrypted(round_of_three[3], server)
    with pytest.raises(InputError, match="declared"):
        decrypt_update({**total, "weight": 0.8}, client)
    duplicated = add_encrypted([round_of_three[3][0], round_of_three[3][0]], server)
    with pytest.raises(InputError, match="declared"):
        decrypt_update({**duplicated, "weight": 0.2}, client)
    with pytest.raises(InputError, match="sent twice"):
        add_encrypted([round_of_three[3][1], *round_of_three[3][1:]], server)


def test_ciphertext_is_at_most_four_times_fp32_on_a_large_update(kits):
    _, server, client = kits
    rng = np.random.default_rng(5)
    params = {"w": (0.1 * rng.normal(size=(1100, 1000))).astype(np.float32)}
    payload = encrypt_update(params, params, 1.0, client, CKKS, workers=2)  # 135 chunks: the process pool
    n_values = params["w"].size
    assert payload_nbytes(payload) <= 4 * 4 * n_values
    assert payload_nbytes(payload) >= 3 * 4 * n_values  # it is a ciphertext, not a compressed plaintext
    mean, _ = decrypt_update(add_encrypted([payload], server), client, workers=2)
    assert np.abs(mean["w"] - params["w"]).max() <= math.ldexp(1.0, 1 + CKKS.headroom_bits - 16)


def test_fingerprint_is_the_provisioning_key_id(kits, other_client):
    ctx, server, client = kits
    reloaded = context_from_bytes(client_context_bytes(client), role="client")
    fingerprints = {context_fingerprint(c) for c in (ctx, client, reloaded)}
    assert len(fingerprints) == 1 and len(next(iter(fingerprints))) == 64
    assert context_fingerprint(other_client) not in fingerprints
    with pytest.raises(InputError, match="server's context cannot derive it"):
        context_fingerprint(server)


def test_ciphertext_from_a_different_context_is_refused_by_the_server(kits, other_client, round_of_three):
    _, server, _ = kits
    reference, sites, _, payloads = round_of_three
    foreign = encrypt_update(sites[2], reference, 0.3, other_client, CKKS, workers=1)
    with pytest.raises(InputError, match="update of c.*different context"):
        add_encrypted([payloads[0], payloads[1], foreign], server, names=["a", "b", "c"])
    with pytest.raises(InputError, match="different context"):
        add_encrypted([foreign], server, expected_fingerprint=payloads[0]["fingerprint"])


def test_another_provisioning_key_cannot_decrypt(kits, other_client, round_of_three):
    _, server, _ = kits
    total = add_encrypted(round_of_three[3], server)
    with pytest.raises(InputError, match="different context/key"):
        decrypt_update(total, other_client)
    # With the key id forged, the slots themselves decode to garbage under another key.
    forged = {**total, "fingerprint": context_fingerprint(other_client)}
    with pytest.raises(InputError, match="decrypted update.*different context/key"):
        decrypt_update(forged, other_client)


def test_plaintext_update_in_an_encrypted_round(kits, round_of_three):
    _, server, _ = kits
    reference, _, _, payloads = round_of_three
    with pytest.raises(InputError, match="update of b.*plaintext update in an encrypted round"):
        add_encrypted([payloads[0], reference], server, names=["a", "b"])


def test_layout_and_params_must_agree(kits, round_of_three):
    _, server, client = kits
    reference, sites, _, payloads = round_of_three
    scaled = {k: v * 4 if v.dtype.kind == "f" else v for k, v in reference.items()}
    other_frames = encrypt_update(sites[0], scaled, 0.2, client, CKKS, workers=1)
    with pytest.raises(InputError, match="update of #1.*exponent"):
        add_encrypted([payloads[0], other_frames], server)
    with pytest.raises(InputError, match="parameters"):
        add_encrypted([payloads[0], {**payloads[1], "params": {**payloads[1]["params"], "headroom_bits": 3}}], server)
    with pytest.raises(InputError, match="chunks"):
        add_encrypted([payloads[0], {**payloads[1], "chunks": payloads[1]["chunks"][:-1]}], server)
    with pytest.raises(InputError, match="TenSEAL context"):
        encrypt_update(sites[0], reference, 0.2, client, CKKSParams(scale_bits=14))
    with pytest.raises(InputError, match="secret key"):
        encrypt_update(sites[0], reference, 0.2, server, CKKS)
    with pytest.raises(InputError, match="secret key"):
        decrypt_update(payloads[0], server)


def test_load_context_from_kit_files(kits, tmp_path):
    ctx, _, _ = kits
    (tmp_path / "server_context.tenseal").write_bytes(server_context_bytes(ctx))
    (tmp_path / "client_context.tenseal").write_bytes(client_context_bytes(ctx))
    assert not load_context(tmp_path / "server_context.tenseal", role="server").has_secret_key()
    assert load_context(tmp_path / "client_context.tenseal", role="client").has_secret_key()

    with pytest.raises(InputError, match="does not exist.*startup/ folder holds server_context.tenseal.*he: true"):
        load_context(tmp_path / "missing.tenseal", role="server")
    (tmp_path / "garbage.tenseal").write_bytes(b"not a context at all")
    with pytest.raises(InputError, match="not a TenSEAL context.*Fix: .*client_context.tenseal"):
        load_context(tmp_path / "garbage.tenseal", role="client")
    (tmp_path / "leaked.tenseal").write_bytes(client_context_bytes(ctx))
    with pytest.raises(InputError, match="must never hold.*Fix: re-provision"):
        load_context(tmp_path / "leaked.tenseal", role="server")
    with pytest.raises(InputError, match="without the secret key.*Fix: use client_context.tenseal"):
        load_context(tmp_path / "server_context.tenseal", role="client")
    with pytest.raises(InputError, match="role"):
        load_context(tmp_path / "server_context.tenseal", role="admin")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"coeff_mod_bit_sizes": (60, 60, 60, 60)}, "128-bit security"),
        ({"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (60, 52)}, "128-bit security"),
        ({"scale_bits": 30}, "capacity"),
        ({"fields_per_slot": 4}, "capacity"),
        ({"coeff_mod_bit_sizes": (52,)}, ">= 2 prime"),
        ({"coeff_mod_bit_sizes": (61, 52)}, "20..60"),
        ({"poly_modulus_degree": 1000}, "one of"),
        ({"scale_bits": 41}, "12..40"),
    ],
)
def test_ckks_params_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        CKKSParams(**kwargs)


def test_ckks_params_json_and_builder_args():
    params = CKKSParams(coeff_mod_bit_sizes=[60, 40])
    assert params.coeff_mod_bit_sizes == (60, 40)
    assert CKKSParams.from_json(params.to_json()) == params
    assert CKKS.builder_args() == {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [52, 52], "scale_bits": 15}
    assert CKKS.field_bits == 18 and CKKS.packing().slots == 4096
    with pytest.raises(InputError, match="ckks"):
        CKKSParams.from_json({"poly_modulus_degree": 8192, "surprise": 1})


def test_decoding_error_of_a_sum_of_eight_is_far_below_half(kits):
    """The precision argument, measured: integer-valued slots survive 8 additions exactly."""
    _, server, client = kits
    cfg = CKKS.packing()
    rng = np.random.default_rng(7)
    # Fields of each ciphertext up to 2**magnitude_bits / 8, so the sum fills the field.
    fields = rng.integers(-(2 ** (cfg.magnitude_bits - 3)), 2 ** (cfg.magnitude_bits - 3) + 1, size=(8, 2, cfg.slots))
    slots = (fields[:, 0] + fields[:, 1] * 2.0**cfg.field_bits).astype(np.float64)
    blobs = [ts.ckks_vector(client, s).serialize() for s in slots]
    total = ts.ckks_vector_from(server, blobs[0])
    for blob in blobs[1:]:
        total.add_(ts.ckks_vector_from(server, blob))
    decoded = np.asarray(ts.ckks_vector_from(client, total.serialize()).decrypt())
    error = np.abs(decoded - slots.sum(axis=0)).max()
    assert error < 0.25, error


def test_contribution_tags_need_the_key_and_bind_job_round_site_and_weight(kits):
    from hospital_fl.privacy.he import Contribution, contribution_tags
    from hospital_fl.privacy.he_packing import TAG_FIELDS, tag_bound

    ctx, server, client = kits
    base = contribution_tags(ctx, Contribution("job", 1, "site-1"), 0.5, CKKS)
    assert base.shape == (TAG_FIELDS,) and int(np.abs(base).max()) <= tag_bound(CKKS.packing())
    assert np.array_equal(contribution_tags(client, Contribution("job", 1, "site-1"), 0.5, CKKS), base)  # same key
    others = [
        contribution_tags(ctx, Contribution("job-2", 1, "site-1"), 0.5, CKKS),
        contribution_tags(ctx, Contribution("job", 2, "site-1"), 0.5, CKKS),
        contribution_tags(ctx, Contribution("job", 1, "site-2"), 0.5, CKKS),
        contribution_tags(ctx, Contribution("job", 1, "site-1"), 0.25, CKKS),
        contribution_tags(make_context(CKKS), Contribution("job", 1, "site-1"), 0.5, CKKS),  # another key
    ]
    assert all(not np.array_equal(t, base) for t in others)
    with pytest.raises(InputError, match="keyed with the hospitals' secret key"):
        contribution_tags(server, Contribution("job", 1, "site-1"), 0.5, CKKS)


def test_a_malformed_announcement_is_refused_with_the_field():
    from hospital_fl.privacy.he import AggregateClaim

    with pytest.raises(InputError, match="announced weight of site-1"):
        AggregateClaim("job", 0, {"site-1": 1.5})
    with pytest.raises(InputError, match="non-empty"):
        AggregateClaim("job", 0, {})
    with pytest.raises(InputError, match="contribution round"):
        AggregateClaim("job", -1, {"site-1": 0.5})


def test_kit_facts_and_the_site_policy_field_are_validated(tmp_path):
    from hospital_fl.privacy.he_kit import HEKitFacts, facts_from_json, read_kit_facts, write_kit_facts
    from hospital_fl.provisioning.schema import PrivacyConfig

    facts = HEKitFacts("client", "ab" * 32, hospitals=2, min_aggregate_sites=3)
    write_kit_facts(tmp_path / "f.json", facts)
    assert read_kit_facts(tmp_path / "f.json") == facts and facts.required_sites == 2  # a consortium of two
    assert read_kit_facts(tmp_path / "missing.json") is None
    with pytest.raises(InputError, match="min_aggregate_sites.*integer >= 2"):
        facts_from_json({**facts.to_json(), "min_aggregate_sites": 1})
    with pytest.raises(InputError, match="key_id"):
        facts_from_json({"role": "server", "key_id": "not hex"})
    with pytest.raises(InputError, match="min_aggregate_sites.*an aggregate of one hospital"):
        PrivacyConfig("dp_required", 8.0, 4.0, 1e-5, min_aggregate_sites=1)
