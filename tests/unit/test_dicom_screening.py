import pickle

import numpy as np
import pytest
from dicom_factory import cr_skeleton
from hospital_fl.data.ingest.screening import (
    REASONS,
    DicomRejected,
    ScreeningConfig,
    header_info,
    read_dicom,
    screen_header,
)
from hospital_fl.errors import InputError
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset

RG1_UNCR = get_testdata_file("RG1_UNCR.dcm")


def _image(rows=300, cols=300, frames=1, samples=1, photometric="MONOCHROME2", **tags) -> FileDataset:
    """A small uncompressed 12-bit CR chest image; ``tags`` override or add attributes."""
    ds = cr_skeleton()
    ds.PatientID = "MRN-7"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    pixels = np.random.default_rng(0).integers(0, 4096, rows * cols * samples * frames, dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def _roundtrip(ds: FileDataset, tmp_path) -> FileDataset:
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    return read_dicom(path)


def _screen(ds, cfg: ScreeningConfig | None = None) -> DicomRejected:
    with pytest.raises(DicomRejected) as caught:
        screen_header(ds, cfg or ScreeningConfig())
    return caught.value


def test_real_chest_radiograph_passes_and_reports_its_header():
    ds = read_dicom(RG1_UNCR)

    screen_header(ds, ScreeningConfig())
    info = header_info(ds)

    assert info == {
        "sop_instance_uid": "1.3.6.1.4.1.5962.1.1.9.1.1.20040826185059.5457",
        "patient_id": "9RG1",
        "view_position": "PA",
        "modality": "CR",
        "rows": 1955,
        "columns": 1841,
        "frames": 1,
        "transfer_syntax": "1.2.840.10008.1.2.1",
        "transfer_syntax_name": "Explicit VR Little Endian",
        "photometric": "MONOCHROME1",
        "bits_stored": 15,
    }
    assert all(type(v) in (str, int) for v in info.values())


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # some vendors write lower case
def test_synthetic_image_passes_after_a_round_trip_and_view_is_upper_cased(tmp_path):
    ds = _roundtrip(_image(ViewPosition="pa"), tmp_path)

    screen_header(ds, ScreeningConfig())

    assert header_info(ds)["view_position"] == "PA"


@pytest.mark.parametrize(
    "content",
    [b"", b"Patient list\nDOE^JANE,MRN-7\n", bytes(range(256)) * 3, b"\0" * 128 + b"DICM"],
    ids=["empty", "text", "garbage", "preamble-only"],
)
def test_files_that_are_not_dicom_are_rejected_as_not_dicom(tmp_path, content):
    path = tmp_path / "DOE_JANE.dcm"
    path.write_bytes(content)

    with pytest.raises(DicomRejected) as caught:
        read_dicom(path)

    assert caught.value.reason == "not_dicom"
    assert "DOE_JANE" not in str(caught.value)  # paths can name patients; details never quote them


def test_missing_file_is_the_callers_problem_not_a_rejection(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_dicom(tmp_path / "absent.dcm")


def test_file_cut_short_in_the_pixel_data_is_truncated(tmp_path):
    path = tmp_path / "cut.dcm"
    _image().save_as(path, enforce_file_format=True)
    path.write_bytes(path.read_bytes()[:-1000])
    ds = read_dicom(path)

    rejected = _screen(ds)

    assert rejected.reason == "truncated_pixel_data"
    assert "needs 180000" in rejected.detail


def test_image_without_pixel_data_is_rejected(tmp_path):
    ds = _image()
    del ds.PixelData

    rejected = _screen(_roundtrip(ds, tmp_path))

    assert rejected.reason == "no_pixel_data"


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_other_modalities_are_rejected_with_the_value_the_rule_and_the_fix(tmp_path, modality):
    rejected = _screen(_roundtrip(_image(Modality=modality), tmp_path))

    assert rejected.reason == "modality_not_allowed"
    assert str(rejected) == (
        f"modality_not_allowed: Modality is {modality!r}; only CR, DX images are used. Fix: export the chest "
        "radiograph series only, or add the modality to ScreeningConfig.allowed_modalities"
    )


def test_allowed_modalities_are_configurable_and_case_insensitive(tmp_path):
    ds = _roundtrip(_image(Modality="DX"), tmp_path)

    screen_header(ds, ScreeningConfig(allowed_modalities=("dx",)))

    assert _screen(ds, ScreeningConfig(allowed_modalities=("CR",))).reason == "modality_not_allowed"


def test_knee_is_not_a_chest(tmp_path):
    rejected = _screen(_roundtrip(_image(BodyPartExamined="KNEE"), tmp_path))

    assert rejected.reason == "body_part_not_chest"
    assert "BodyPartExamined is 'KNEE'" in rejected.detail


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("body_part", ["CHEST", "chest", "CHEST PA", "CHEST_AP", "THORAX", "LUNGS", "TORAX", "", None])
def test_chest_spellings_and_an_absent_body_part_are_accepted(tmp_path, body_part):
    ds = _image()
    if body_part is None:
        del ds.BodyPartExamined
    else:
        ds.BodyPartExamined = body_part

    screen_header(_roundtrip(ds, tmp_path), ScreeningConfig())  # raises if refused


@pytest.mark.parametrize("photometric, samples", [("RGB", 3), ("YBR_FULL", 3), ("PALETTE COLOR", 1)])
def test_colour_images_are_rejected(tmp_path, photometric, samples):
    ds = _roundtrip(_image(photometric=photometric, samples=samples), tmp_path)

    rejected = _screen(ds)

    assert rejected.reason == "unsupported_photometric"
    assert f"PhotometricInterpretation is {photometric!r}" in rejected.detail


def test_real_rgb_secondary_capture_is_rejected_as_colour():
    ds = read_dicom(get_testdata_file("SC_rgb.dcm"))

    rejected = _screen(ds, ScreeningConfig(allowed_modalities=("OT",), min_size=16))

    assert rejected.reason == "unsupported_photometric"


def test_small_images_are_rejected_naming_the_size(tmp_path):
    ds = _roundtrip(_image(rows=300, cols=200), tmp_path)

    rejected = _screen(ds)

    assert rejected.reason == "too_small"
    assert rejected.detail.startswith("the image is 300 x 200 pixels; both sides must be >= 256 pixels")
    screen_header(ds, ScreeningConfig(min_size=200))


def test_multiframe_is_rejected_by_default_and_accepted_under_first(tmp_path):
    ds = _roundtrip(_image(frames=2), tmp_path)

    rejected = _screen(ds)
    screen_header(ds, ScreeningConfig(multiframe="first"))

    assert rejected.reason == "multiframe"
    assert "NumberOfFrames is 2" in rejected.detail
    assert header_info(ds)["frames"] == 2


def test_multiframe_missing_a_frame_is_truncated_even_under_first(tmp_path):
    ds = _image(frames=2)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    rejected = _screen(_roundtrip(ds, tmp_path), ScreeningConfig(multiframe="first"))

    assert rejected.reason == "truncated_pixel_data"


@pytest.mark.parametrize("missing", ["Rows", "Columns", "BitsAllocated"])
def test_missing_image_pixel_attributes_are_a_bad_header(tmp_path, missing):
    ds = _image()
    delattr(ds, missing)

    rejected = _screen(_roundtrip(ds, tmp_path))

    assert rejected.reason == "bad_header"
    assert rejected.detail.startswith(f"{missing} is missing; ")


def test_missing_transfer_syntax_is_a_bad_header():
    ds = _image()
    del ds.file_meta.TransferSyntaxUID

    rejected = _screen(ds)

    assert rejected.reason == "bad_header"
    assert "TransferSyntaxUID" in rejected.detail


def test_rejection_has_reason_detail_and_survives_pickling():
    rejected = DicomRejected("too_small", "the image is 10 x 10 pixels")

    copy = pickle.loads(pickle.dumps(rejected))

    assert (copy.reason, copy.detail) == ("too_small", "the image is 10 x 10 pixels")
    assert str(copy) == "too_small: the image is 10 x 10 pixels"
    assert len(REASONS) == 10


def test_unknown_reason_code_is_refused():
    with pytest.raises(InputError, match="reason: got 'nope'; it must be one of not_dicom, no_pixel_data"):
        DicomRejected("nope", "x")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"allowed_modalities": ()},
            (
                "allowed_modalities: got (); it must be a non-empty tuple of Modality codes. "
                'Fix: use e.g. allowed_modalities=("CR", "DX")'
            ),
        ),
        (
            {"allowed_modalities": "CR"},
            "allowed_modalities: got 'CR'; it must be a non-empty tuple of Modality codes.",
        ),
        (
            {"min_size": 8},
            "min_size: got 8; it must be a whole number of pixels >= 16. Fix: use e.g. min_size=256",
        ),
        (
            {"multiframe": "all"},
            'multiframe: got \'all\'; it must be one of reject, first. Fix: use "reject" or "first"',
        ),
    ],
)
def test_bad_screening_config_names_the_value_rule_and_fix(kwargs, message):
    with pytest.raises(InputError) as caught:
        ScreeningConfig(**kwargs)

    assert str(caught.value).startswith(message)
