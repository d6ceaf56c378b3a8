import numpy as np
import pytest
from hospital_fl.data.pneumoniamnist import embedded_path, load_pneumoniamnist
from hospital_fl.data.splits import SplitConfig, dirichlet_site_split
from hospital_fl.errors import InputError


def test_embedded_dataset_has_official_split_sizes():
    data = load_pneumoniamnist()

    assert {k: len(v) for k, v in data.items()} == {"train": 4690, "val": 524, "test": 621}
    assert data["train"].images.shape[1:] == (28, 28)
    assert data["test"].labels.sum() == 387  # pneumonia cases in the official test split


def test_split_is_deterministic_disjoint_and_complete():
    labels = np.random.default_rng(1).integers(0, 2, 3000)

    a = dirichlet_site_split(labels, SplitConfig(seed=3))
    b = dirichlet_site_split(labels, SplitConfig(seed=3))

    every = np.concatenate([np.concatenate([p.train, p.val, p.test]) for p in a])
    assert sorted(every.tolist()) == list(range(3000))
    for x, y in zip(a, b):
        for portion in ("train", "val", "test"):
            assert np.array_equal(getattr(x, portion), getattr(y, portion))
    c = dirichlet_site_split(labels, SplitConfig(seed=4))
    assert not np.array_equal(a[0].train, c[0].train)


def test_split_skews_labels_and_sizes_and_keeps_both_classes_everywhere(federated_data):
    fractions = [s.positive_fraction for s in federated_data.sites]
    sizes = [len(s.train) for s in federated_data.sites]

    assert max(fractions) - min(fractions) > 0.3
    assert max(sizes) > 3 * min(sizes)
    for site in federated_data.sites:
        for portion in (site.train, site.val, site.test):
            assert set(np.unique(portion.labels)) == {0, 1}


def test_held_out_test_is_never_given_to_a_site(federated_data):
    test = {img.tobytes() for img in federated_data.held_out_test.images}
    site_images = [img.tobytes() for s in federated_data.sites for img in s.train.images]

    overlap = sum(img in test for img in site_images)

    # PneumoniaMNIST has a handful of byte-identical images across official splits
    assert overlap <= 5


def test_bad_alpha_names_the_value_rule_and_fix():
    with pytest.raises(
        InputError, match=r"alpha: got -1.0; the Dirichlet alpha must be > 0. Fix: use e.g. --alpha 0.5"
    ):
        SplitConfig(alpha=-1.0)


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="dataset file: got .*nope.npz.*Fix: pass --data PATH"):
        load_pneumoniamnist(tmp_path / "nope.npz")


def test_corrupt_data_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(embedded_path().read_bytes()[:1000])

    with pytest.raises(InputError, match="it must be a readable .npz archive"):
        load_pneumoniamnist(bad)


def test_unknown_site_name_lists_the_known_ones(federated_data):
    with pytest.raises(InputError, match=r"site name: got 'hospital-x'; it must be one of \['site-1'"):
        federated_data.site("hospital-x")


def test_too_many_sites_for_the_data_is_refused():
    labels = np.array([0] * 40 + [1] * 40)
    with pytest.raises(InputError, match="use fewer sites"):
        dirichlet_site_split(labels, SplitConfig(num_sites=5))


def test_float_images_are_refused_with_the_rule(tmp_path):
    raw = {k: v for k, v in np.load(embedded_path()).items()}
    raw["train_images"] = raw["train_images"].astype(np.float32) / 255
    path = tmp_path / "float.npz"
    np.savez(path, **raw)

    with pytest.raises(InputError, match="images must be uint8 grayscale"):
        load_pneumoniamnist(path)
