"""3D brain-tumour segmentation: preprocessing, crops, networks, training, scoring, one FL round."""

import dataclasses
import math

import nrrd
import numpy as np
import pytest
import torch
from hospital_fl.errors import InputError
from hospital_fl.models.seg import SegModelConfig, build_seg_model
from hospital_fl.segmentation.pipeline import (
    SegPipelineConfig,
    SegTrainConfig,
    eval_transforms,
    evaluate,
    make_loader,
    peak_step_memory,
    region_names,
    seg_loss,
    train_epochs,
    train_transforms,
)
from hospital_fl.segmentation.sample import sample_dir
from hospital_fl.segmentation.site_round import clear_loader_cache, get_weights, run_seg_round

DATA = sample_dir()  # the real volumes shipped inside the package, wherever it is installed
PIPE = SegPipelineConfig()
CPU = SegTrainConfig(device="cpu", amp=False)
UNET = SegModelConfig(arch="unet")



def _case(name: str) -> dict:
    return {"image": [str(DATA / f"{name}_image.nrrd")], "label": str(DATA / f"{name}_label.nrrd"), "case": name}


@pytest.fixture(scope="module")
def brain1():
    return eval_transforms(PIPE)(_case("brain1"))


@pytest.fixture(scope="module")
def brain2_loader():
    return make_loader([_case("brain2")], eval_transforms(PIPE), 1, False, cache=True)


def test_preprocessing_resamples_reorients_and_normalises(brain1):
    image, label = brain1["image"], brain1["label"]

    # the shipped crop, 232x256x13 at 0.78x0.78x6.5 mm -> 181x200x40 at 1x1x2 mm, channel first
    assert tuple(image.shape) == (1, 181, 200, 40) and tuple(label.shape) == (1, 181, 200, 40)
    assert np.allclose(image.pixdim.numpy(), (1.0, 1.0, 2.0))
    assert np.all(np.diag(image.affine.numpy())[:3] > 0)  # RAS: axes point right, anterior, superior
    inside = image[image != 0]
    assert abs(float(inside.mean())) < 1e-3 and abs(float(inside.std()) - 1.0) < 1e-3
    assert set(torch.unique(label).tolist()) == {0.0, 1.0}
    native_mm3 = 4137 * 0.78125**2 * 6.5
    assert abs(float(label.sum()) * 2.0 - native_mm3) / native_mm3 < 0.1  # tumour volume kept


def test_modality_files_stack_as_channels():
    case = _case("brain2")
    out = eval_transforms(SegPipelineConfig(spacing=None))({**case, "image": case["image"] * 2})

    assert tuple(out["image"].shape) == (2, 216, 250, 9)  # the shipped crop of brain2, unresampled
    assert torch.equal(out["image"][0], out["image"][1])


def _tumour_share(pos_fraction: float) -> float:
    cfg = SegPipelineConfig(num_crops=48, pos_fraction=pos_fraction, augment=False)
    transform = train_transforms(cfg)
    transform.set_random_state(seed=0)
    crops = transform(_case("brain1"))
    assert all(tuple(c["image"].shape) == (1, *cfg.roi_size) for c in crops)
    return float(np.mean([c["label"].sum() > 0 for c in crops]))


def test_label_aware_crops_hold_tumour_at_the_set_rate():
    always, half, never = _tumour_share(1.0), _tumour_share(0.5), _tumour_share(0.0)

    assert always == 1.0
    # half the crops centred on tumour, plus background crops that happen to graze it
    assert 0.4 <= half < 1.0 and never < half - 0.2


def test_brats_labels_become_overlapping_regions(tmp_path):
    label = np.zeros((16, 16, 16), np.int16)
    label[2:5], label[6:9], label[10:13] = 1, 2, 4  # necrosis, oedema, enhancing
    header = {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)}
    nrrd.write(str(tmp_path / "label.nrrd"), label, header)
    nrrd.write(str(tmp_path / "t1.nrrd"), (label * 10 + 5).astype(np.int16), header)
    cfg = SegPipelineConfig(label_scheme="brats", spacing=None)

    out = eval_transforms(cfg)({"image": [str(tmp_path / "t1.nrrd")], "label": str(tmp_path / "label.nrrd")})

    regions = out["label"].numpy().astype(bool)
    assert region_names(cfg) == ("TC", "WT", "ET") and regions.shape == (3, 16, 16, 16)
    # LPS -> RAS flips the first two axes; compare against the flipped source
    ras = label[::-1, ::-1, :]
    assert np.array_equal(regions[0], (ras == 1) | (ras == 4))
    assert np.array_equal(regions[1], (ras == 1) | (ras == 2) | (ras == 4))
    assert np.array_equal(regions[2], ras == 4)


@pytest.mark.parametrize("arch", ["segresnet", "unet"])
@pytest.mark.parametrize("out_channels", [1, 3])
def test_networks_map_a_crop_to_one_logit_per_region(arch, out_channels):
    model = build_seg_model(SegModelConfig(arch=arch, out_channels=out_channels))

    with torch.no_grad():
        assert model(torch.zeros(1, 1, *PIPE.roi_size)).shape == (1, out_channels, *PIPE.roi_size)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_training_on_a_real_volume_lowers_the_loss():
    pipe = SegPipelineConfig(augment=False, pos_fraction=1.0)
    loader = make_loader([_case("brain1")], train_transforms(pipe), 1, True, cache=True)
    loader.dataset.transform.set_random_state(seed=1)
    fixed = next(iter(loader))
    x, y = fixed["image"].as_tensor(), fixed["label"].as_tensor()
    torch.manual_seed(0)
    model = build_seg_model(UNET)
    loss_fn = seg_loss("dicece")
    with torch.no_grad():
        before = float(loss_fn(model(x), y))

    result = train_epochs(model, loader, dataclasses.replace(CPU, epochs=8, schedule="constant"))

    with torch.no_grad():
        after = float(loss_fn(model.eval()(x), y))
    assert result["steps"] == 8 and math.isfinite(result["mean_loss"])
    assert after < before, (before, after)


def test_sliding_window_scoring_of_a_whole_volume(brain2_loader):
    torch.manual_seed(0)
    scores = evaluate(build_seg_model(UNET), brain2_loader, PIPE, CPU)

    assert scores["cases"] == 1 and set(scores["dice"]) == {"tumour"}
    assert 0.0 <= scores["dice"]["tumour"] <= 1.0 and scores["mean_dice"] == scores["dice"]["tumour"]
    hd95 = scores["hd95"]["tumour"]
    assert (hd95 is None and scores["hd95_undefined"]["tumour"] == 1) or math.isfinite(hd95)


class _Empty(torch.nn.Module):
    def forward(self, x):
        return torch.full_like(x[:, :1], -10.0)


def test_empty_prediction_scores_zero_dice_and_no_hd95(brain2_loader):
    scores = evaluate(_Empty(), brain2_loader, PIPE, CPU)

    assert scores["dice"] == {"tumour": 0.0}
    assert scores["hd95"] == {"tumour": None} and scores["hd95_undefined"] == {"tumour": 1}


def test_site_round_trains_and_reports():
    clear_loader_cache()
    torch.manual_seed(0)
    global_weights = get_weights(build_seg_model(UNET))
    cfg = dataclasses.replace(CPU, steps_per_epoch=1)

    outcome = run_seg_round([_case("brain1")], [_case("brain2")], global_weights, 0, 2, UNET, PIPE, cfg)
    diff = run_seg_round(
        [_case("brain1")], [], global_weights, 1, 2, UNET, PIPE, cfg, fedprox_mu=0.01, send_difference=True
    )

    assert set(outcome.weights) == set(global_weights) and outcome.params_type == "FULL"
    assert set(outcome.metrics) == {"val_dice", "val_dice_tumour", "train_loss"}
    assert all(math.isfinite(v) for v in outcome.metrics.values()) and outcome.n_samples == 1
    assert diff.params_type == "DIFF" and set(diff.metrics) == {"train_loss"}
    assert any(np.abs(v).max() > 0 for v in diff.weights.values())


def test_round_rejects_a_model_that_does_not_fit_the_label_scheme():
    weights = get_weights(build_seg_model(UNET))
    with pytest.raises(InputError, match="out_channels: got 1; the brats label scheme has 3 regions"):
        run_seg_round([], [], weights, 0, 1, UNET, SegPipelineConfig(label_scheme="brats"), CPU)


@pytest.mark.parametrize(
    "build,message",
    [
        (
            lambda: SegPipelineConfig(roi_size=(64, 60, 32)),
            r"roi_size: got \(64, 60, 32\); each side must be a multiple of 8.*Fix: use e.g. \(64, 64, 32\)",
        ),
        (lambda: SegPipelineConfig(label_scheme="lits"), "label_scheme: got 'lits'.*Fix: use binary"),
        (lambda: SegPipelineConfig(pos_fraction=1.5), "pos_fraction.*Fix: use e.g. 0.5"),
        (lambda: SegModelConfig(arch="vnet"), "arch: got 'vnet'.*Fix: use segresnet or unet"),
        (lambda: SegModelConfig(init_filters=12), "init_filters.*multiple of 8.*Fix: use 8"),
        (lambda: SegTrainConfig(loss="ce"), "loss: got 'ce'.*Fix: use dicece"),
    ],
)
def test_bad_settings_name_the_fix(build, message):
    with pytest.raises(InputError, match=message):
        build()


def test_configs_accept_lists_from_json():
    cfg = SegPipelineConfig(roi_size=[32, 32, 32], spacing=[1, 1, 2])

    assert cfg.roi_size == (32, 32, 32) and cfg.spacing == (1.0, 1.0, 2.0)
    hash(cfg)


def test_peak_step_memory_runs_in_a_fresh_process():
    probe = peak_step_memory(UNET, roi=(32, 32, 32))

    assert probe["roi"] == (32, 32, 32) and probe["peak_rss_mb"] > probe["step_rss_mb"] >= 0
    assert probe["seconds"] > 0
