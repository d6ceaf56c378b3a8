"""Fixed-point packing of model updates for CKKS: exact round trips, weighted means, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hospital_fl.errors import InputError
from hospital_fl.privacy.he_packing import (
    TAG_FIELDS,
    Layout,
    PackingConfig,
    dequantize,
    frame_exponents,
    layout_for,
    pack,
    quantize,
    tag_bound,
    unpack,
)

CFG = PackingConfig(slots=1024)


def _model(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "conv.weight": (scale * rng.normal(size=(8, 1, 3, 3))).astype(np.float32),
        "fc.weight": (0.1 * scale * rng.normal(size=(40, 64))).astype(np.float32),
        "fc.bias": np.zeros(40, dtype=np.float32),
        "bn.running_var": (1.0 + rng.random(8)).astype(np.float64),
        "bn.num_batches_tracked": np.array(120, dtype=np.int64),
    }


def _trained(reference: dict[str, np.ndarray], rng: np.random.Generator, steps: int) -> dict[str, np.ndarray]:
    out = {}
    for name, value in reference.items():
        if value.dtype.kind == "f":
            out[name] = (value + 0.05 * rng.normal(size=value.shape)).astype(value.dtype)
        else:
            out[name] = value + steps
    return out


@pytest.mark.parametrize("fields_per_slot,field_bits", [(1, 30), (2, 18), (3, 16), (4, 12)])
def test_pack_unpack_round_trip_with_extremes_and_decoding_noise(fields_per_slot, field_bits):
    cfg = PackingConfig(slots=1024, field_bits=field_bits, fields_per_slot=fields_per_slot)
    rng = np.random.default_rng(fields_per_slot)
    top = 2 ** (field_bits - 1) - 1
    n = 3 * cfg.values_per_chunk - 17  # the last chunk is padded
    ints = rng.integers(-top, top + 1, size=n)
    ints[:8] = [top, -top, top, -top, 0, top, -top, -1]
    ints[-4:] = [-top, top, -top, top]
    chunks = pack(ints, cfg)
    assert chunks.shape == (3, cfg.slots) and chunks.dtype == np.float64
    noise = rng.uniform(-0.45, 0.45, size=chunks.shape)  # CKKS decoding error, below 0.5
    np.testing.assert_array_equal(unpack(chunks + noise, n, cfg), ints)


def test_pack_refuses_a_field_that_does_not_fit():
    with pytest.raises(InputError, match="signed field"):
        pack(np.array([2 ** (CFG.field_bits - 1)]), CFG)


def test_unpack_detects_garbage_slots():
    garbage = np.random.default_rng(0).normal(scale=2.0**40, size=(1, CFG.slots))
    with pytest.raises(InputError, match="different context/key"):
        unpack(garbage, 10, CFG)


def test_frame_exponents_are_exact_powers_of_two_with_headroom():
    cfg = PackingConfig(headroom_bits=2, floor_exponent=0)
    ref = {
        "one": np.array([1.0, -0.5]),
        "above_one": np.array([1.0000001]),
        "small": np.array([0.01]),
        "zero": np.zeros(3),
        "empty": np.zeros(0),
        "big": np.array([-300.0]),
        "count": np.array(1000, dtype=np.int64),
    }
    exps = frame_exponents(ref, cfg)
    # An integer counter's frame is at least 2**magnitude_bits (16 here): a step of at most 1.
    assert exps == {"one": 2, "above_one": 3, "small": 2, "zero": 2, "empty": 2, "big": 11, "count": 16}
    assert frame_exponents({"count": np.array(100_000, dtype=np.int64)}, cfg)["count"] == 17 + 2
    assert frame_exponents({"small": np.array([0.01])}, PackingConfig(floor_exponent=-8))["small"] == -6 + 2


def test_weighted_mean_of_sites_through_packed_sums():
    """Adding packed chunks as float64 is what CKKS addition does to the slots."""
    rng = np.random.default_rng(1)
    reference = _model(rng)
    sites = [_trained(reference, rng, steps) for steps in (10, 20, 35)]
    weights = [0.5, 0.3, 0.2]
    layout = layout_for(sites[0], frame_exponents(reference, CFG))
    summed = sum(pack(quantize(site, layout, w, CFG), CFG) for site, w in zip(sites, weights))
    mean, total_weight = dequantize(unpack(summed, layout.total, CFG), layout, CFG)
    assert total_weight == pytest.approx(1.0, abs=1e-4)
    for name, exponent in zip(layout.names, layout.exponents):
        expected = np.average(np.stack([s[name].astype(np.float64) for s in sites]), axis=0, weights=weights)
        assert mean[name].dtype == reference[name].dtype and mean[name].shape == reference[name].shape
        if reference[name].dtype.kind == "f":
            step = math.ldexp(1.0, exponent - CFG.magnitude_bits)
            assert np.abs(mean[name] - expected).max() <= len(sites) * step
    assert mean["bn.num_batches_tracked"] == round(0.5 * 130 + 0.3 * 140 + 0.2 * 155)
    assert np.all(mean["fc.bias"] != 0)  # the zero tensor's frame held the trained biases


def test_a_round_missing_a_site_still_gives_the_weighted_mean_of_the_others():
    rng = np.random.default_rng(2)
    reference = _model(rng)
    sites = [_trained(reference, rng, 5) for _ in range(2)]
    layout = layout_for(sites[0], frame_exponents(reference, CFG))
    summed = pack(quantize(sites[0], layout, 0.25, CFG), CFG) + pack(quantize(sites[1], layout, 0.35, CFG), CFG)
    mean, total_weight = dequantize(unpack(summed, layout.total, CFG), layout, CFG)
    assert total_weight == pytest.approx(0.6, abs=1e-4)
    expected = (0.25 * sites[0]["fc.weight"] + 0.35 * sites[1]["fc.weight"]) / 0.6
    step = math.ldexp(1.0, layout.exponents[layout.names.index("fc.weight")] - CFG.magnitude_bits)
    assert np.abs(mean["fc.weight"] - expected).max() <= 2 * step / 0.6


def test_integer_counter_of_a_fresh_model_fits_its_frame():
    reference = {"bn.num_batches_tracked": np.array(0, dtype=np.int64)}
    layout = layout_for(reference, frame_exponents(reference, CFG))
    sites = [np.array(400, dtype=np.int64), np.array(650, dtype=np.int64)]
    summed = sum(pack(quantize({"bn.num_batches_tracked": s}, layout, 0.5, CFG), CFG) for s in sites)
    mean, _ = dequantize(unpack(summed, layout.total, CFG), layout, CFG)
    assert mean["bn.num_batches_tracked"].dtype == np.int64 and abs(int(mean["bn.num_batches_tracked"]) - 525) <= 1


def test_zero_reference_tensor_decodes_zeros_and_values_within_its_frame():
    reference = {"bias": np.zeros(5, dtype=np.float32)}
    layout = layout_for(reference, frame_exponents(reference, CFG))
    assert layout.exponents == (CFG.floor_exponent + CFG.headroom_bits,)
    zero, _ = dequantize(unpack(pack(quantize(reference, layout, 1.0, CFG), CFG), layout.total, CFG), layout, CFG)
    np.testing.assert_array_equal(zero["bias"], 0)
    trained = {"bias": np.array([3.9, -3.9, 0.001, 0, 1], dtype=np.float32)}
    out, _ = dequantize(unpack(pack(quantize(trained, layout, 1.0, CFG), CFG), layout.total, CFG), layout, CFG)
    np.testing.assert_allclose(out["bias"], trained["bias"], atol=math.ldexp(1.0, 2 - CFG.magnitude_bits))


def test_layout_json_round_trip_and_total():
    rng = np.random.default_rng(3)
    params = _model(rng)
    layout = layout_for(params, frame_exponents(params, CFG))
    assert layout.names == tuple(sorted(params))
    assert layout.total == sum(v.size for v in params.values()) + 1 + TAG_FIELDS  # values, canary, tags
    data = json.loads(json.dumps(layout.to_json()))
    assert Layout.from_json(data) == layout
    with pytest.raises(InputError, match="layout"):
        Layout.from_json({"names": []})


def test_value_outside_its_frame_names_the_tensor_and_the_fix():
    reference = {"w": np.array([1.0, -1.0], dtype=np.float32)}
    layout = layout_for(reference, frame_exponents(reference, CFG))  # frame 2**2
    with pytest.raises(InputError) as err:
        quantize({"w": np.array([4.5, 0.0], dtype=np.float32)}, layout, 1.0, CFG)
    assert "update tensor w" in str(err.value) and "4.5" in str(err.value) and "raise headroom_bits" in str(err.value)
    with pytest.raises(InputError, match="headroom_bits"):
        quantize({"w": np.array([np.nan, 0.0], dtype=np.float32)}, layout, 1.0, CFG)


@pytest.mark.parametrize("weight", [0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_weight_out_of_range(weight):
    params = {"w": np.ones(3)}
    layout = layout_for(params, frame_exponents(params, CFG))
    with pytest.raises(InputError, match="aggregation weight"):
        quantize(params, layout, weight, CFG)


def test_layout_mismatch_names_the_first_difference():
    params = {"a": np.ones((2, 3), dtype=np.float32), "b": np.ones(4, dtype=np.float32)}
    layout = layout_for(params, frame_exponents(params, CFG))
    other_shape = layout_for({**params, "b": np.ones(5, dtype=np.float32)}, frame_exponents(params, CFG))
    with pytest.raises(InputError, match="shape .* for b"):
        layout.check_same(other_shape, "update of site-2")
    other_exp = layout_for(params, {"a": 2, "b": 7})
    with pytest.raises(InputError, match="exponent 7 for b"):
        layout.check_same(other_exp, "update of site-2")
    with pytest.raises(InputError, match="missing"):
        layout.check_same(layout_for({"a": params["a"]}, {"a": 2}), "update of site-2")
    with pytest.raises(InputError, match="float32"):
        quantize({**params, "b": np.ones(4, dtype=np.float64)}, layout, 1.0, CFG)
    with pytest.raises(InputError, match="frame"):
        layout_for({"c": np.ones(2)}, {"a": 2})


def test_canary_garbage_is_refused():
    params = {"w": np.ones(3)}
    layout = layout_for(params, frame_exponents(params, CFG))
    ints = quantize(params, layout, 0.5, CFG)
    for canary in (0, -5, 2**CFG.magnitude_bits * 2):
        bad = ints.copy()
        bad[layout.canary_index] = canary
        with pytest.raises(InputError, match="decrypted update.*different context/key or was altered"):
            dequantize(bad, layout, CFG)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"slots": 1000},
        {"slots": 512},
        {"field_bits": 7},
        {"field_bits": 31},
        {"fields_per_slot": 0},
        {"fields_per_slot": 5},
        {"headroom_bits": 9},
        {"floor_exponent": -17},
        {"field_bits": 27, "fields_per_slot": 2},
        {"slots": 4096.0},
    ],
)
def test_packing_config_validation(kwargs):
    with pytest.raises(InputError):
        PackingConfig(**kwargs)


def test_packing_config_properties():
    cfg = PackingConfig()
    assert cfg.magnitude_bits == 16 and cfg.values_per_chunk == 8192


def test_tags_sum_through_the_packing_and_bad_tags_are_refused():
    params = {"w": np.ones(3)}
    layout = layout_for(params, frame_exponents(params, CFG))
    bound = tag_bound(CFG)
    a, b = np.full(TAG_FIELDS, bound, dtype=np.int64), np.arange(-TAG_FIELDS, 0, dtype=np.int64)
    summed = pack(quantize(params, layout, 0.5, CFG, a), CFG) + pack(quantize(params, layout, 0.5, CFG, b), CFG)
    ints = unpack(summed, layout.total, CFG)
    assert list(ints[layout.canary_index + 1 :]) == list(a + b)
    for bad in (np.full(TAG_FIELDS, bound + 1), np.zeros(TAG_FIELDS - 1, dtype=np.int64), np.zeros(TAG_FIELDS)):
        with pytest.raises(InputError, match="contribution tags"):
            quantize(params, layout, 0.5, CFG, bad)
