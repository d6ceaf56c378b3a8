import numpy as np
import pytest
import torch
from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical.personalization import (
    PersonalizationConfig,
    normalization_keys,
    personalization_summary,
    personalize,
    with_local_normalization,
)
from hospital_fl.models.cxr import CXRClassifier, build_cxr_model
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import get_weights, predict_proba, train_local
from hospital_fl.training.metrics import rank_auc


def _balanced_bce(model, arrays) -> float:
    """The training objective (each class weighted equally), measured without augmentation."""
    probs = torch.as_tensor(predict_proba(model, arrays.images, "cpu"), dtype=torch.float64)
    y = torch.as_tensor(arrays.labels, dtype=torch.float64)
    weight = torch.where(y == 1, (1 - y.mean()) / y.mean(), 1.0)
    return float(torch.nn.functional.binary_cross_entropy(probs, y, weight=weight))


def test_fine_tuning_two_sites_lowers_their_training_loss_and_leaves_the_global_model_alone(federated_data):
    pooled = federated_data.pooled("train")
    torch.manual_seed(0)
    global_model = build_cxr_model()
    train_local(global_model, pooled.images, pooled.labels, TrainConfig(epochs=1, device="cpu"))
    before = get_weights(global_model)
    cfg = PersonalizationConfig(epochs=2, train=TrainConfig(device="cpu", lr=1e-3))

    aucs = {}
    for name in ("site-2", "site-4"):
        site = federated_data.site(name)
        personal = personalize(global_model, site.train.images, site.train.labels, cfg)

        assert personal.train.steps >= 2 and personal.local_keys == ()
        assert _balanced_bce(personal.model, site.train) < _balanced_bce(global_model, site.train)
        after = get_weights(personal.model)
        assert any(not np.array_equal(after[k], before[k]) for k in before)
        g = rank_auc(predict_proba(global_model, site.test.images, "cpu"), site.test.labels)
        p = rank_auc(predict_proba(personal.model, site.test.images, "cpu"), site.test.labels)
        # the pooled-data model stands in for both the global and the centralized model here
        aucs[name] = {"global": g, "personalized": p, "local_only": 0.5, "centralized": g}

    assert all(np.array_equal(v, before[k]) for k, v in get_weights(global_model).items())
    summary = personalization_summary(aucs)
    assert [s.site for s in summary.sites] == ["site-2", "site-4"]
    for s in summary.sites:
        assert s.gain == pytest.approx(aucs[s.site]["personalized"] - aucs[s.site]["global"])


def test_local_normalization_takes_norm_parameters_and_buffers_from_the_local_model():
    torch.manual_seed(0)
    global_model = CXRClassifier(arch="densenet121", image_size=64)
    torch.manual_seed(1)
    local_model = CXRClassifier(arch="densenet121", image_size=64)
    with torch.no_grad():  # GroupNorm starts at weight 1, bias 0 in both: make the local ones differ
        for k in normalization_keys(local_model):
            local_model.state_dict()[k].add_(0.5)

    merged, keys = with_local_normalization(global_model, local_model)

    assert "net.features.norm0.weight" in keys and "net.features.norm5.bias" in keys
    assert not any("conv" in k.rsplit(".", 2)[-2] for k in keys)
    m, g, lo = merged.state_dict(), global_model.state_dict(), local_model.state_dict()
    assert all(torch.equal(m[k], lo[k]) and not torch.equal(m[k], g[k]) for k in keys)
    assert all(torch.equal(m[k], g[k]) for k in m if k not in keys)
    # the compact network's InstanceNorm layers carry no parameters: nothing to keep local
    assert normalization_keys(build_cxr_model()) == ()


def test_batchnorm_buffers_count_as_normalization_entries():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))

    assert normalization_keys(model) == (
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    )


def test_bad_personalization_inputs():
    model = build_cxr_model()
    images, labels = np.zeros((4, 28, 28), np.uint8), np.array([0, 1, 0, 1])
    with pytest.raises(InputError, match="local_model: got None; keep_local_normalization takes"):
        personalize(model, images, labels, PersonalizationConfig(keep_local_normalization=True))
    with pytest.raises(InputError, match="local_model: got .* the local and global models must share one architecture"):
        with_local_normalization(model, CXRClassifier(arch="densenet121", image_size=32))
    with pytest.raises(InputError, match="epochs: got -1; it must be an integer >= 0"):
        PersonalizationConfig(epochs=-1)
    unchanged = personalize(model, images, labels, PersonalizationConfig(epochs=0))
    assert unchanged.train is None and unchanged.model is not model


def test_summary_says_where_personalization_helps_and_by_how_much():
    aucs = {
        "site-1": {"global": 0.90, "personalized": 0.93, "local_only": 0.85, "centralized": 0.92},
        "site-2": {"global": 0.95, "personalized": 0.92, "local_only": 0.80, "centralized": 0.96},
        "site-3": {"global": 0.90, "personalized": 0.905, "local_only": 0.91, "centralized": 0.89},
    }

    summary = personalization_summary(aucs, min_gain=0.01)

    assert summary.helped == ("site-1",) and summary.hurt == ("site-2",)
    s1, s2, s3 = summary.sites
    assert s1.gain == pytest.approx(0.03) and s1.best == "personalized"
    assert s2.gain == pytest.approx(-0.03) and s2.best == "centralized"
    assert s3.verdict == "no clear change" and s3.best == "local_only"
    assert summary.markdown().splitlines()[0] == (
        "- site-1: personalization helps (+0.030 AUC: global 0.900 -> personalized 0.930; local-only 0.850, "
        "centralized 0.920; best here: personalized)"
    )
    assert summary.to_dict()["helped"] == ["site-1"]
    with pytest.raises(InputError, match=r"AUCs of site-9: got \['global'\]; each site needs"):
        personalization_summary({"site-9": {"global": 0.9}})
    with pytest.raises(InputError, match="an AUC must lie in"):
        personalization_summary({"s": {"global": 90, "personalized": 0.9, "local_only": 0.9, "centralized": 0.9}})
