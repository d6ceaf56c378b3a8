import numpy as np
import pytest
import torch
from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical.gradcam import (
    cam_method_for,
    find_target_layer,
    gradcam_maps,
    plot_gradcam,
    region_mass,
    region_occlusion_effect,
    sample_gradcam,
)
from hospital_fl.models.cxr import CXRClassifier, build_cxr_model
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import train_local

SEEDS = (0, 1, 2)


def test_target_layer_is_the_last_spatial_map_of_each_arch():
    assert find_target_layer(CXRClassifier()) == "net.net.layer_2"  # 128 x 4 x 4 at 28 x 28
    assert find_target_layer(CXRClassifier(arch="densenet121", image_size=64)) == "net.class_layers.relu"


def test_region_mass_by_hand():
    # 8 x 8 maps: the centre box is rows/cols 2-5 (16 pixels), the corners four 2 x 2 boxes (16 pixels);
    # each is a quarter of the image, so "per unit area" = share of mass / 0.25
    centre_only = np.zeros((8, 8))
    centre_only[2:6, 2:6] = 1.0
    uniform = np.ones((8, 8))
    mixed = np.zeros((8, 8))
    mixed[0, 0], mixed[4, 4] = 3.0, 1.0  # corner 3 of 4 -> share 0.75 -> 3.0; centre 0.25 -> 1.0

    r = region_mass(np.stack([centre_only, uniform, mixed, np.zeros((8, 8))]))

    np.testing.assert_allclose(r.center_share[:3], [1.0, 0.25, 0.25])
    np.testing.assert_allclose(r.center_per_area[:3], [4.0, 1.0, 1.0])
    np.testing.assert_allclose(r.corners_per_area[:3], [0.0, 1.0, 3.0])
    assert np.isnan(r.center_share[3])  # an all-zero map has no mass to share
    with pytest.raises(InputError, match=r"center_fraction/corner_fraction: got \(0.6, 0.25\)"):
        region_mass(np.stack([uniform]), center_fraction=0.6)


class _BlobDetector(torch.nn.Module):
    """Logit = mean of ReLU(x) - 0.01: positive exactly when the image holds a bright patch
    (background 0 scales to -1); a global-pooling head, so Grad-CAM's map is the patch."""

    image_size = 28

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        self.features = torch.nn.ReLU()
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(1, 1))
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()
            self.head[2].weight.fill_(1.0)
            self.head[2].bias.fill_(-0.01)

    def forward(self, x):
        return self.head(self.features(self.conv(x)))


def test_gradcam_maps_follow_a_feature_whose_place_is_known():
    images = np.zeros((2, 28, 28), np.uint8)
    images[0, 11:17, 11:17] = 255  # centre
    images[1, 0:5, 23:28] = 255  # top-right corner
    model = _BlobDetector()

    maps, probs = gradcam_maps(model, images)

    assert find_target_layer(model) == "features"
    assert (probs > 0.5).all() and maps.shape == (2, 28, 28) and (maps >= 0).all()
    r = region_mass(maps)
    assert r.center_share[0] > 0.9 and r.corners_share[1] > 0.9
    assert not model.features._forward_hooks  # MONAI's hooks went on a copy, not on the caller's model


@pytest.fixture(scope="module")
def briefly_trained(federated_data):
    """The compact classifier after 2 epochs on all hospitals' training data, for 3 seeds
    (about 5 s each on one CPU thread)."""
    pooled = federated_data.pooled("train")
    models = {}
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = build_cxr_model()
        train_local(model, pooled.images, pooled.labels, TrainConfig(epochs=2, device="cpu", seed=seed))
        models[seed] = model
    return models


def test_sample_of_correct_and_wrong_test_images_is_plotted(briefly_trained, federated_data, tmp_path):
    test = federated_data.held_out_test

    sample = sample_gradcam(briefly_trained[0], test.images, test.labels, n_correct=6, n_incorrect=6)

    assert sample.correct.sum() == 6 and (~sample.correct).sum() == 6
    assert (
        sample.maps.shape == (12, 28, 28) and sample.target_layer == "net.net.layer_2" and sample.method == "hirescam"
    )
    assert plot_gradcam(sample, tmp_path / "gradcam.png").stat().st_size > 10_000


def test_the_model_relies_on_the_centre_more_than_the_corners_by_occlusion(briefly_trained, federated_data):
    # mean |change of the logit| when each region (equal areas) is set to mid-grey
    for seed, model in briefly_trained.items():
        centre, corners = region_occlusion_effect(model, federated_data.held_out_test.images)
        assert centre > 2 * corners, (seed, centre, corners)


@pytest.mark.xfail(
    strict=True,
    reason=(
        "Grad-CAM proper (the report uses HiResCAM for this network) does not reliably favour the lungs. Mean centre/corner mass per unit area "
        "on the held-out test, seeds 0/1/2, 2 epochs: layer_2 (chosen) 1.06/0.80, 0.81/0.97, 1.02/0.94; layer_1 "
        "1.17/0.79, 0.79/1.14, 1.10/0.92; layer_0 1.22/0.84, 1.15/0.94, 1.18/0.88 but at 4 epochs 0.62/1.40, "
        "0.76/1.30, 1.08/0.94. The head flattens the 4 x 4 map into a Linear layer (position-specific weights, no "
        "global pooling), which Grad-CAM's spatially averaged gradient weights misread: gradient x activation per "
        "position (HiResCAM) at layer_2 gave 1.12/0.90, 1.17/0.88, 1.22/0.87, and occlusion shows the model relies on "
        "the centre (test above)"
    ),
)
def test_gradcam_proper_on_the_flattening_head_does_not_reliably_favour_the_lungs(briefly_trained, federated_data):
    measured = _centre_and_corners(briefly_trained, federated_data, "gradcam")
    assert all(centre > corners for centre, corners in measured.values()), measured


def _centre_and_corners(models, federated_data, method: str) -> dict:
    test = federated_data.held_out_test
    measured = {}
    for seed, model in models.items():
        maps, _ = gradcam_maps(model, test.images, method=method)
        r = region_mass(maps)
        measured[seed] = (float(np.nanmean(r.center_per_area)), float(np.nanmean(r.corners_per_area)))
    return measured


def test_the_maps_the_report_draws_lie_on_the_lungs_more_than_the_corners(briefly_trained, federated_data):
    assert {cam_method_for(m) for m in briefly_trained.values()} == {"hirescam"}  # the compact network

    measured = _centre_and_corners(briefly_trained, federated_data, "auto")

    print("\nHIRESCAM_CENTRE_CORNERS", {s: (round(a, 3), round(b, 3)) for s, (a, b) in measured.items()})
    assert all(centre > corners for centre, corners in measured.values()), measured


def test_hirescam_maps_follow_a_feature_whose_place_is_known():
    images = np.zeros((2, 28, 28), np.uint8)
    images[0, 11:17, 11:17] = 255  # centre
    images[1, 0:5, 23:28] = 255  # top-right corner

    maps, probs = gradcam_maps(_BlobDetector(), images, method="hirescam")

    assert (probs > 0.5).all() and maps.shape == (2, 28, 28) and (maps >= 0).all()
    r = region_mass(maps)
    assert r.center_share[0] > 0.9 and r.corners_share[1] > 0.9


def test_an_unknown_map_method_is_named():
    with pytest.raises(InputError, match="method: got 'lime'"):
        gradcam_maps(_BlobDetector(), np.zeros((1, 28, 28), np.uint8), method="lime")
