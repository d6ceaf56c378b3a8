import dataclasses

import numpy as np
import pytest
import torch
from hospital_fl.errors import InputError
from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import get_weights, predict_proba, scheduled_lr, set_weights, train_local
from hospital_fl.training.site_round import run_site_round

FAST = TrainConfig(epochs=1, batch_size=32, augment=False, device="cpu")


@pytest.mark.parametrize("task,outputs", [("pneumonia", 1), ("chestxray14", 14)])
def test_compact_network_heads(task, outputs):
    model = build_cxr_model(ModelConfig(task=task))

    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, outputs)


def test_densenet121_production_network_at_224():
    model = build_cxr_model(ModelConfig(arch="densenet121", task="chestxray14", image_size=224))

    with torch.no_grad():
        assert model(torch.zeros(1, 1, 224, 224)).shape == (1, 14)
    assert 6.5e6 < sum(p.numel() for p in model.parameters()) < 7.5e6


@pytest.mark.parametrize("arch", ["compact", "densenet121"])
def test_networks_have_no_batchnorm(arch):
    model = build_cxr_model(ModelConfig(arch=arch, image_size=224 if arch == "densenet121" else 28))

    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(InputError, match="arch: got 'resnet'; it must be one of"):
        ModelConfig(arch="resnet")


def test_training_lowers_the_loss_and_learns(federated_data):
    site = federated_data.site("site-2")
    torch.manual_seed(0)
    model = build_cxr_model()
    before = get_weights(model)

    first = train_local(model, site.train.images, site.train.labels, FAST)
    second = train_local(model, site.train.images, site.train.labels, FAST)

    assert second.mean_loss < first.mean_loss
    assert any(not np.allclose(before[k], v) for k, v in get_weights(model).items())
    probs = predict_proba(model, site.test.images, "cpu")
    assert probs.shape == (len(site.test),) and np.all((probs >= 0) & (probs <= 1))


def test_fedprox_term_keeps_weights_near_the_global_model(federated_data):
    site = federated_data.site("site-2")
    torch.manual_seed(0)
    start = get_weights(build_cxr_model())

    def drift(mu):
        model = build_cxr_model()
        set_weights(model, start)
        anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
        train_local(
            model,
            site.train.images,
            site.train.labels,
            dataclasses.replace(FAST, lr=5e-3),
            anchor=anchor,
            fedprox_mu=mu,
        )
        return sum(float(((get_weights(model)[k] - start[k]) ** 2).sum()) for k in start)

    assert drift(10.0) < 0.5 * drift(0.0)


def test_cosine_schedule_decays_over_the_whole_run():
    cfg = TrainConfig(lr=1e-3)

    assert scheduled_lr(cfg, 0.0) == pytest.approx(1e-3)
    assert scheduled_lr(cfg, 0.5) < 1e-3
    assert scheduled_lr(cfg, 1.0) == pytest.approx(5e-5)
    assert scheduled_lr(dataclasses.replace(cfg, schedule="constant"), 0.9) == 1e-3


def test_site_round_reports_metrics_samples_and_time(federated_data):
    site = federated_data.site("site-3")
    weights = get_weights(build_cxr_model())

    outcome = run_site_round(site, weights, round_index=0, total_rounds=2, train_cfg=FAST, model_cfg=ModelConfig())

    assert outcome.n_samples == len(site.train)
    assert set(outcome.metrics) == {"val_auc", "test_auc", "train_loss"}
    assert outcome.train_seconds > 0
    assert set(outcome.weights) == set(weights)


def test_small_images_are_resized_for_the_224_network():
    model = build_cxr_model(ModelConfig(arch="densenet121", image_size=224))
    images = np.random.default_rng(0).integers(0, 255, (2, 28, 28), dtype=np.uint8)

    probs = predict_proba(model, images, "cpu")

    assert probs.shape == (2,)
