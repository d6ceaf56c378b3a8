import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hospital_fl.errors import InputError
from hospital_fl.segmentation.datalist import DatalistRules, load_datalist, validate_datalist
from hospital_fl.segmentation.sample import sample_cases, write_sample_datalists
from hospital_fl.segmentation.synthetic import SYNTHETIC_DESCRIPTION, SyntheticConfig, write_synthetic_federation
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SHAPE = (16, 12, 8)


def nifti(path, data, spacing=(1.0, 1.0, 2.0)):
    nib.save(nib.Nifti1Image(np.asarray(data), np.diag([*spacing, 1.0])), str(path))
    return path.name


def mask(value=1, shape=SHAPE):
    m = np.zeros(shape, np.uint8)
    m[4:8, 4:8, 2:5] = value
    return m


def image(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def write_datalist(folder, **sections):
    path = folder / "datalist.json"
    path.write_text(json.dumps(sections))
    return path


def reasons(report):
    return {(p.section, p.case): p.reason for p in report.problems}


# ----------------------------------------------------------------------------- the real sample


def test_shipped_sample_is_usable_with_its_real_spacing(tmp_path):
    paths = write_sample_datalists(tmp_path)

    assert set(paths) == {"site-1", "site-2"}
    for site, case in zip(("site-1", "site-2"), ("brain1", "brain2")):
        report = validate_datalist(paths[site], modalities=1)
        assert report.problems == []
        assert [c["case"] for c in report.require("training")] == [case]
        assert [c["case"] for c in report.require("validation")] == [case]
        spacing = report.geometry["training"][case]["spacing"]
        assert spacing == pytest.approx((0.78, 0.78, 6.5), abs=0.01)  # the headers hold 0.78125 x 0.78125 x 6.5
        assert "not a measure of accuracy" in json.loads(paths[site].read_text())["description"]
    shapes = {c: g["shape"] for p in paths.values() for c, g in validate_datalist(p).geometry["training"].items()}
    assert shapes == {"brain1": [232, 256, 13], "brain2": [216, 250, 9]}


def test_sample_masks_keep_every_tumour_voxel():
    import nrrd

    counts = {c["case"]: int(nrrd.read(c["label"])[0].sum()) for c in sample_cases()}

    assert counts == {"brain1": 4137, "brain2": 453}


# ----------------------------------------------------------------------------- bad cases


@pytest.fixture
def messy(tmp_path):
    """A two-modality datalist: two good cases and one case per kind of problem."""
    d = tmp_path
    for name in ("good", "good2", "shape", "spacing", "empty", "labels3", "few", "missing", "flat"):
        nifti(d / f"{name}_t1.nii.gz", image(1))
        nifti(d / f"{name}_flair.nii.gz", image(2))
        nifti(d / f"{name}_seg.nii.gz", mask())
    nifti(d / "shape_flair.nii.gz", image(2, shape=(16, 12, 9)))
    nifti(d / "spacing_seg.nii.gz", mask(), spacing=(1.0, 1.0, 2.5))
    nifti(d / "empty_seg.nii.gz", mask(0))
    m3 = mask()
    m3[10:12, 2:4, 1:3] = 3
    nifti(d / "labels3_seg.nii.gz", m3)
    (d / "missing_flair.nii.gz").unlink()
    nifti(d / "flat_t1.nii.gz", image(1)[:, :, 0])
    (d / "corrupt_t1.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))
    nifti(d / "corrupt_flair.nii.gz", image(2))
    nifti(d / "corrupt_seg.nii.gz", mask())
    # a truncated copy of a real gzip NRRD, with its intact mask
    real = sample_cases()[1]
    data = open(real["image"][0], "rb").read()
    (d / "trunc_image.nrrd").write_bytes(data[: len(data) // 2])
    shutil.copy(real["label"], d / "trunc_label.nrrd")

    def case(name, images=("t1", "flair")):
        return {"image": [f"{name}_{m}.nii.gz" for m in images], "label": f"{name}_seg.nii.gz"}

    training = [case(n) for n in ("good", "shape", "spacing", "empty", "missing", "flat", "corrupt")]
    training.append(case("few", images=("t1",)))
    training.append({"image": ["trunc_image.nrrd", "corrupt_flair.nii.gz"], "label": "trunc_label.nrrd"})
    return write_datalist(
        d,
        modalities=["t1", "flair"],
        training=training,
        validation=[case("good2"), case("labels3")],
        test=[case("empty")],
    )


def test_each_bad_case_is_listed_with_its_reason_and_the_good_ones_stay(messy):
    report = validate_datalist(messy)

    assert reasons(report) == {
        ("training", "shape"): "shape_mismatch",
        ("training", "spacing"): "spacing_mismatch",
        ("training", "empty"): "empty_mask",
        ("training", "missing"): "missing_file",
        ("training", "flat"): "not_3d",
        ("training", "corrupt"): "unreadable",
        ("training", "few"): "modality_count",
        ("training", "trunc"): "unreadable",
        ("validation", "labels3"): "unexpected_labels",
    }
    assert [c["case"] for c in report.usable["training"]] == ["good"]
    assert [c["case"] for c in report.usable["validation"]] == ["good2"]
    assert [c["case"] for c in report.usable["test"]] == ["empty"]  # an empty mask is a valid test case
    by_case = {p.case: p for p in report.problems}
    assert by_case["shape"].file.endswith("shape_flair.nii.gz") and "(16, 12, 9)" in by_case["shape"].detail
    assert "2.5" in by_case["spacing"].detail and "Fix:" in by_case["spacing"].detail
    assert by_case["missing"].file.endswith("missing_flair.nii.gz")
    assert by_case["few"].detail.startswith("the case has 1 image channel")
    assert "{0, 1, 3}" in by_case["labels3"].detail and "'binary'" in by_case["labels3"].detail
    assert all(p.detail for p in report.problems)
    assert json.loads(json.dumps(report.to_json()))["counts"]["training"] == {"usable": 1, "excluded": 8}
    assert "training 1/9 usable" in report.summary()


def test_label_three_is_foreign_to_brats_too_and_empty_masks_can_be_allowed(messy):
    brats = validate_datalist(messy, label_scheme="brats")
    lenient = validate_datalist(messy, allow_empty_masks=True, check_labels=False)

    assert reasons(brats)[("validation", "labels3")] == "unexpected_labels"
    assert "{1, 2, 4}" in next(p.detail for p in brats.problems if p.case == "labels3")
    assert ("training", "empty") not in reasons(lenient) and ("validation", "labels3") not in reasons(lenient)


def test_required_modality_count_comes_from_the_argument_or_the_datalist(tmp_path):
    nifti(tmp_path / "a_t1.nii.gz", image())
    nifti(tmp_path / "a_seg.nii.gz", mask())
    path = write_datalist(tmp_path, training=[{"image": "a_t1.nii.gz", "label": "a_seg.nii.gz"}])

    assert validate_datalist(path).problems == []  # nothing to compare with
    assert reasons(validate_datalist(path, modalities=2)) == {("training", "a"): "modality_count"}
    with pytest.raises(InputError, match="modalities"):
        DatalistRules(modalities=0)
    with pytest.raises(InputError, match="label_scheme"):
        validate_datalist(path, label_scheme="kits")


def test_channels_on_a_fourth_nifti_axis_count_as_modalities(tmp_path):
    nifti(tmp_path / "a.nii.gz", np.stack([image(1), image(2)], axis=-1))
    nifti(tmp_path / "a_seg.nii.gz", mask())
    path = write_datalist(tmp_path, training=[{"image": "a.nii.gz", "label": "a_seg.nii.gz"}])

    report = validate_datalist(path, modalities=2)

    assert report.problems == []
    assert report.geometry["training"]["a"] == {"shape": list(SHAPE), "spacing": [1.0, 1.0, 2.0], "channels": 2}


def test_a_folder_is_read_as_a_dicom_series(tmp_path):
    rows, cols, slices = 12, 10, 5
    pixels = np.random.default_rng(0).integers(0, 1000, (slices, rows, cols)).astype(np.uint16)
    series, study = generate_uid(), generate_uid()
    (tmp_path / "series").mkdir()
    for z in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR image storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(f"{z}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = "MR", study, series, z + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 3.0 * z], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.7], 3.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels[z].tobytes()
        ds.save_as(tmp_path / "series" / f"{z}.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "series" / "0.dcm").Rows == rows
    # voxel grid (columns, rows, slices) with spacing (column 0.7, row 0.5, slice 3.0) mm
    nifti(tmp_path / "seg.nii.gz", mask(shape=(cols, rows, slices)), spacing=(0.7, 0.5, 3.0))
    nifti(tmp_path / "seg_wrong.nii.gz", mask(shape=(cols, rows, slices)), spacing=(0.5, 0.7, 3.0))
    path = write_datalist(
        tmp_path,
        training=[{"image": "series", "label": "seg.nii.gz"}, {"image": "series", "label": "seg_wrong.nii.gz"}],
    )

    report = validate_datalist(path)

    assert [c["case"] for c in report.usable["training"]] == ["seg"]
    assert report.geometry["training"]["seg"]["spacing"] == pytest.approx([0.7, 0.5, 3.0])
    assert reasons(report) == {("training", "seg_wrong"): "spacing_mismatch"}


def test_require_names_the_datalist_and_its_problems(messy):
    report = validate_datalist(messy)

    assert len(report.require("training")) == 1
    with pytest.raises(InputError) as err:
        report.require("training", minimum=3)
    message = str(err.value)
    assert str(messy) in message and "1 usable of 9 listed" in message and "shape_mismatch" in message
    with pytest.raises(InputError, match="no cases"):
        validate_datalist(messy).require("nonexistent")


# ----------------------------------------------------------------------------- loading


def test_load_resolves_paths_ids_and_sections(tmp_path):
    (tmp_path / "lists").mkdir()
    path = tmp_path / "lists" / "dl.json"
    path.write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "tumour"},
                "training": [
                    {"image": "../img/BraTS_001_t1.nii.gz", "label": "../img/BraTS_001_seg.nii.gz"},
                    {"image": ["/abs/a.nii.gz", "b.nii.gz"], "label": "x/BraTS_001_seg.nii.gz"},
                ],
            }
        )
    )

    dl = load_datalist(path)
    other = load_datalist(path, base_dir=tmp_path / "elsewhere")

    assert dl["labels"] == {"0": "background", "1": "tumour"}
    assert dl["validation"] == [] and dl["test"] == []
    first, second = dl["training"]
    assert first == {
        "image": [str(tmp_path / "img" / "BraTS_001_t1.nii.gz")],
        "label": str(tmp_path / "img" / "BraTS_001_seg.nii.gz"),
        "case": "BraTS_001",
    }
    assert second["image"] == ["/abs/a.nii.gz", str(tmp_path / "lists" / "b.nii.gz")]
    assert second["case"] == "BraTS_001-2"  # ids stay unique within a section
    assert other["training"][1]["image"][1] == str(tmp_path / "elsewhere" / "b.nii.gz")


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        ("[]", "top level"),
        ('{"validation": []}', '"training" section is required'),
        ('{"training": {"image": "a"}}', "must be a list"),
        ('{"training": ["a.nii.gz"]}', "must be an object"),
        ('{"training": [{"image": "a.nii.gz"}]}', "missing \\['label'\\]"),
        ('{"training": [{"image": 3, "label": "s.nii.gz"}]}', "path or a non-empty list"),
        ('{"training": [{"image": [], "label": "s.nii.gz"}]}', "path or a non-empty list"),
        ('{"training": [{"image": "a", "label": ["s.nii.gz"]}]}', "must be one path"),
        ('{"modalities": "t1", "training": []}', "list of names"),
    ],
)
def test_load_rejects_broken_datalists(tmp_path, content, match):
    path = tmp_path / "dl.json"
    if content is not None:
        path.write_text(content)

    with pytest.raises(InputError, match=match) as err:
        load_datalist(path)
    assert "Fix:" in str(err.value)


# ----------------------------------------------------------------------------- synthetic federation


def test_synthetic_federation_is_valid_non_iid_and_deterministic(tmp_path):
    kw = dict(sites=3, cases_per_site=(4, 3, 2), shape=(32, 32, 24), seed=5)
    paths = write_synthetic_federation(tmp_path / "a", **kw)
    again = write_synthetic_federation(tmp_path / "b", **kw)
    other = write_synthetic_federation(tmp_path / "c", **{**kw, "seed": 6})

    assert set(paths) == {"site-1", "site-2", "site-3", "pooled"}
    lists = {k: load_datalist(p) for k, p in paths.items()}
    assert {k: (len(d["training"]), len(d["validation"])) for k, d in lists.items()} == {
        "site-1": (3, 1),
        "site-2": (2, 1),
        "site-3": (1, 1),
        "pooled": (6, 3),
    }
    for section in ("training", "validation"):
        union = [c for s in ("site-1", "site-2", "site-3") for c in lists[s][section]]
        assert lists["pooled"][section] == union
    means = []
    for name in ("site-1", "site-2", "site-3"):
        assert json.loads(paths[name].read_text())["description"] == SYNTHETIC_DESCRIPTION
        site_means = []
        for case in lists[name]["training"] + lists[name]["validation"]:
            img = nib.load(case["image"][0]).get_fdata()
            seg = np.asarray(nib.load(case["label"]).dataobj)
            assert img.shape == seg.shape == (32, 32, 24)
            assert set(np.unique(seg)) == {0, 1} and seg.sum() > 0
            site_means.append(img.mean())
        means.append(np.mean(site_means))
    assert min(abs(a - b) for a, b in zip(means, means[1:] + means[:1])) > 0.02  # sites differ in intensity
    for name in paths:
        assert validate_datalist(paths[name], modalities=1).problems == []

    def blobs(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.nii.gz"))}

    assert blobs(tmp_path / "a") == blobs(tmp_path / "b")
    assert blobs(tmp_path / "a").keys() == blobs(tmp_path / "c").keys()
    assert blobs(tmp_path / "a") != blobs(tmp_path / "c")
    assert again["pooled"].read_text() == paths["pooled"].read_text()
    assert other["pooled"].read_text() == paths["pooled"].read_text()  # same layout, relative paths


def test_synthetic_brats_labels_and_modalities(tmp_path):
    paths = write_synthetic_federation(
        tmp_path, sites=2, cases_per_site=2, shape=(24, 24, 16), label_scheme="brats", modalities=2
    )

    report = validate_datalist(paths["pooled"], label_scheme="brats", modalities=2)

    assert report.problems == [] and len(report.usable["training"]) == 2
    values = set()
    for case in report.usable["training"] + report.usable["validation"]:
        assert len(case["image"]) == 2
        values |= set(np.unique(np.asarray(nib.load(case["label"]).dataobj)).tolist())
    assert values <= {0, 1, 2, 4} and 3 not in values
    for bad in (dict(sites=2, cases_per_site=(3,)), dict(cases_per_site=1), dict(shape=(8, 64, 64))):
        with pytest.raises(InputError):
            SyntheticConfig(**bad)
