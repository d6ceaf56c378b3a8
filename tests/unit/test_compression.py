"""Update codecs: sizes, reconstruction error, top-k's error feedback, config errors."""

import numpy as np
import pytest
from hospital_fl.compression.codecs import CompressionConfig, decode, encode, payload_bytes
from hospital_fl.errors import InputError


def _update(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0, 0.01, (64, 32, 3, 3)).astype(np.float32),
        "fc.bias": rng.normal(0, 0.01, (10,)).astype(np.float32),
        "steps": np.array(7, dtype=np.int64),
    }


def test_fp16_halves_and_int8_quarters_the_bytes_with_bounded_error():
    u = _update()
    raw = payload_bytes(u)
    peak = np.abs(u["conv.weight"]).max()
    # fp16: half a unit in the last place (11 significant bits); int8: half a quantisation step
    for codec, ratio, tol in (("fp16", 2.0, peak * 2.0**-11), ("int8", 4.0, peak / 127 / 2 * 1.0001)):
        payload, _ = encode(u, CompressionConfig(codec))
        back = decode(payload)
        assert raw / payload_bytes(payload) == pytest.approx(ratio, rel=0.01)
        assert back["steps"] == 7 and back["steps"].dtype == np.int64
        assert back["conv.weight"].dtype == np.float32
        err = np.abs(back["conv.weight"] - u["conv.weight"]).max()
        assert err <= tol


def test_topk_sends_one_percent_and_error_feedback_catches_up():
    u = _update()
    cfg = CompressionConfig("topk", 0.01)
    payload, residual = encode(u, cfg)
    assert payload_bytes(u) / payload_bytes(payload) > 40  # 1% of values, 8 bytes each (index + value)
    sent = decode(payload)
    flat = u["conv.weight"].ravel()
    kept = np.flatnonzero(sent["conv.weight"].ravel())
    assert len(kept) == int(np.ceil(0.01 * flat.size))
    assert np.abs(flat[kept]).min() >= np.sort(np.abs(flat))[-len(kept)]  # the largest magnitudes
    np.testing.assert_allclose(sent["conv.weight"] + residual["conv.weight"], u["conv.weight"], atol=1e-7)
    # the same update again: what was held back now competes with it, so the sum of what
    # two rounds send plus the residual equals both updates
    payload2, residual2 = encode(u, cfg, residual)
    total = sent["conv.weight"] + decode(payload2)["conv.weight"] + residual2["conv.weight"]
    np.testing.assert_allclose(total, 2 * u["conv.weight"], atol=1e-6)


def test_decode_refuses_an_unmarked_update():
    with pytest.raises(ValueError, match="not a compressed update"):
        decode({"w": np.ones(2)})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(codec="zip"), "compression.codec: got 'zip'"),
        (dict(codec="topk", topk_fraction=0.0), "compression.topk_fraction: got 0.0; it must lie in (0, 1]"),
        (dict(codec="topk", topk_fraction=1.5), "compression.topk_fraction: got 1.5"),
    ],
)
def test_compression_config_out_of_range_is_named(kwargs, message):
    with pytest.raises(InputError) as err:
        CompressionConfig(**kwargs)
    assert message in str(err.value)
