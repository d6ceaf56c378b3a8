import numpy as np
import pydicom
import pytest
from dicom_factory import cr_skeleton
from hospital_fl.data.ingest.pixels import PREPROCESSING_VERSION, to_model_image
from hospital_fl.data.ingest.screening import DicomRejected, read_dicom
from hospital_fl.errors import InputError
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    MPEG2MPML,
    JPEG2000Lossless,
)

MAX_12_BIT = 4095


def _phantom(rows=300, cols=300, seed=0) -> np.ndarray:
    """12-bit stored values: a bright disc on a gradient, with noise."""
    y, x = np.mgrid[0:rows, 0:cols]
    disc = ((y - rows / 2) ** 2 + (x - cols / 3) ** 2 < (min(rows, cols) / 4) ** 2) * 1500.0
    noise = np.random.default_rng(seed).normal(0, 40, (rows, cols))
    return np.clip(500 + 6 * x + disc + noise, 0, MAX_12_BIT).astype(np.uint16)


def _image(pixels: np.ndarray, photometric="MONOCHROME2", bits_stored=12, **tags) -> FileDataset:
    """An uncompressed CR dataset holding ``pixels`` ((rows, cols) or (frames, rows, cols))."""
    ds = cr_skeleton()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def _roundtrip(ds: FileDataset, path) -> pydicom.Dataset:
    ds.save_as(path, enforce_file_format=True)
    return read_dicom(path)


@pytest.fixture(scope="module")
def rg1_uncr():
    ds = read_dicom(get_testdata_file("RG1_UNCR.dcm"))
    return ds, to_model_image(ds, 224)


def test_real_monochrome1_chest_is_224_uint8_with_dark_lungs_and_bright_spine(rg1_uncr):
    ds, image = rg1_uncr
    stored = ds.pixel_array.astype(float)
    # 224-pixel coordinates -> stored pixels: 1955 rows fill 224, columns start after a 6-pixel margin
    step = 1955 / 224

    def region(rows, cols):
        return (
            image[rows[0] : rows[1], cols[0] : cols[1]].mean(),
            stored[
                int(rows[0] * step) : int(rows[1] * step), int((cols[0] - 6) * step) : int((cols[1] - 6) * step)
            ].mean(),
        )

    lung_shown, lung_stored = region((50, 100), (45, 85))
    spine_shown, spine_stored = region((40, 110), (104, 120))

    assert image.shape == (224, 224) and image.dtype == np.uint8
    assert lung_stored > spine_stored  # MONOCHROME1: high stored values display dark
    assert lung_shown < spine_shown - 50  # after inversion the lungs are dark, the spine bright


def test_aspect_ratio_is_kept_by_black_margins(rg1_uncr):
    _, image = rg1_uncr
    # 1955 x 1841 -> 224 x round(1841 * 224 / 1955) = 224 x 211, centred: 6 black columns left, 7 right

    assert (image[:, :6] == 0).all() and (image[:, 217:] == 0).all()
    assert image[:, 6].max() > 100 and image[:, 216].max() > 100


def test_wide_image_is_letterboxed_top_and_bottom():
    pixels = np.full((150, 300), 3000, dtype=np.uint16)
    pixels[:, ::2] = 1000  # two levels so the percentile window has a range
    ds = _image(pixels)

    image = to_model_image(ds, 64)

    assert (image[:16] == 0).all() and (image[48:] == 0).all()
    assert (image[16:48] > 100).all()  # 150 x 300 -> 32 x 64: fine stripes average to mid-grey


def test_jpeg2000_lossless_gives_the_same_array_as_uncompressed(rg1_uncr):
    _, uncompressed = rg1_uncr
    ds = read_dicom(get_testdata_file("RG1_J2KR.dcm"))

    image = to_model_image(ds, 224)

    assert np.abs(image.astype(int) - uncompressed).max() <= 1


def test_jpeg2000_lossy_stays_close_to_uncompressed(rg1_uncr):
    _, uncompressed = rg1_uncr
    ds = read_dicom(get_testdata_file("RG1_J2KI.dcm"))

    image = to_model_image(ds, 224)

    assert np.abs(image.astype(float) - uncompressed).mean() < 0.5


def test_monochrome1_and_inverted_monochrome2_give_the_same_array(tmp_path):
    stored = _phantom()
    mono1 = _roundtrip(_image(stored, "MONOCHROME1"), tmp_path / "m1.dcm")
    mono2 = _roundtrip(_image(MAX_12_BIT - stored, "MONOCHROME2"), tmp_path / "m2.dcm")

    a, b = to_model_image(mono1, 128), to_model_image(mono2, 128)

    assert np.array_equal(a, b)
    assert a.std() > 20  # not a trivially constant image


def test_monochrome1_and_inverted_monochrome2_agree_under_a_window(tmp_path):
    stored = _phantom()
    # the mirrored window: centre - 0.5 maps to MAX - (centre - 0.5) (PS3.3 C.11.2.1.2.1)
    mono1 = _image(stored, "MONOCHROME1", WindowCenter=2000, WindowWidth=1800)
    mono2 = _image(MAX_12_BIT - stored, "MONOCHROME2", WindowCenter=MAX_12_BIT - 2000 + 1, WindowWidth=1800)

    a, b = to_model_image(mono1, 128), to_model_image(mono2, 128)

    assert np.abs(a.astype(int) - b).max() <= 1
    assert not np.array_equal(a, to_model_image(_image(stored, "MONOCHROME1"), 128))  # the window was used


def test_rescale_is_applied_before_the_window():
    stored = _phantom()
    plain = _image(stored, WindowCenter=2000, WindowWidth=1800)
    # same physical values, stored as (value + 1000) / 2 and described by slope 2, intercept -1000
    rescaled = _image(
        ((stored.astype(int) + 1000) // 2).astype(np.uint16),
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=2000,
        WindowWidth=1800,
    )

    a, b = to_model_image(plain, 128), to_model_image(rescaled, 128)

    assert np.abs(a.astype(int) - b).mean() < 1.0


def test_voi_lut_sequence_is_applied():
    stored = _phantom()

    def with_lut(entries):
        ds = _image(stored, WindowCenter=2000, WindowWidth=100)  # the LUT wins over the window
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 12]
        item.LUTData = entries
        ds.VOILUTSequence = [item]
        return to_model_image(ds, 128)

    rising, falling = with_lut(list(range(4096))), with_lut(list(range(4095, -1, -1)))
    full_range_window = to_model_image(_image(stored, WindowCenter=2048, WindowWidth=4096), 128)

    assert np.abs(rising.astype(int) - full_range_window).max() <= 1  # identity LUT == window over 0..4095
    assert np.abs(rising.astype(int) + falling - 255).max() <= 1  # a falling LUT mirrors it


def test_unusable_window_falls_back_to_the_percentile_window():
    stored = _phantom()

    a = to_model_image(_image(stored, WindowCenter=2000, WindowWidth=0), 128)
    b = to_model_image(_image(stored), 128)

    assert np.array_equal(a, b)


def test_signed_storage_gives_the_same_array_as_unsigned():
    stored = _phantom()

    a = to_model_image(_image(stored), 128)
    b = to_model_image(_image(stored.astype(np.int16) - 2048), 128)

    assert np.array_equal(a, b)


def test_32_bit_storage_gives_the_same_array_as_16_bit():
    stored = _phantom()

    a = to_model_image(_image(stored), 128)
    b = to_model_image(_image(stored.astype(np.uint32)), 128)

    assert np.abs(a.astype(int) - b).max() <= 1


def test_unused_high_bits_are_ignored():
    stored = _phantom()
    dirty = stored | (np.random.default_rng(1).integers(0, 16, stored.shape, dtype=np.uint16) << 12)

    a, b = to_model_image(_image(stored), 128), to_model_image(_image(dirty), 128)

    assert np.array_equal(a, b)


def test_multiframe_is_refused_by_default_and_first_keeps_frame_zero(tmp_path):
    frames = np.stack([_phantom(seed=0), _phantom(seed=1)[::-1]])
    ds = _roundtrip(_image(frames), tmp_path / "two.dcm")

    with pytest.raises(DicomRejected) as caught:
        to_model_image(ds, 128)
    first = to_model_image(ds, 128, multiframe="first")

    assert caught.value.reason == "multiframe"
    assert np.array_equal(first, to_model_image(_image(frames[0]), 128))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_lossless_transfer_syntaxes_match_the_uncompressed_image(name):
    reference = to_model_image(read_dicom(get_testdata_file("MR_small.dcm")), 64)

    image = to_model_image(read_dicom(get_testdata_file(name)), 64)

    assert np.array_equal(image, reference)


@pytest.mark.parametrize(
    "name", ["JPEG-LL.dcm", "JPGExtended.dcm", "JPEG2000.dcm", "emri_small_RLE.dcm", "image_dfl.dcm"]
)
def test_other_compressed_and_deflated_files_decode(name):
    ds = read_dicom(get_testdata_file(name))

    image = to_model_image(ds, 64, multiframe="first")

    assert image.shape == (64, 64) and image.dtype == np.uint8
    assert image.std() > 5


def test_missing_decoder_plugin_names_the_transfer_syntax_and_the_package(monkeypatch):
    ds = read_dicom(get_testdata_file("MR_small_jp2klossless.dcm"))
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})  # as if no plugin were installed

    with pytest.raises(DicomRejected) as caught:
        to_model_image(ds, 64)

    assert str(caught.value) == (
        "decode_failed: the transfer syntax is JPEG 2000 Image Compression (Lossless Only) "
        "(1.2.840.10008.1.2.4.90); no installed plugin decodes it. Fix: pip install pylibjpeg pylibjpeg-openjpeg"
    )


def test_transfer_syntax_without_any_decoder_is_decode_failed():
    ds = read_dicom(get_testdata_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML

    with pytest.raises(DicomRejected) as caught:
        to_model_image(ds, 64)

    assert caught.value.reason == "decode_failed"
    assert "MPEG2 Main Profile / Main Level" in caught.value.detail
    assert "pydicom has no decoder for it" in caught.value.detail


def test_corrupt_compressed_stream_is_decode_failed():
    ds = read_dicom(get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])  # a J2K start, then nothing valid

    with pytest.raises(DicomRejected) as caught:
        to_model_image(ds, 64)

    assert caught.value.reason == "decode_failed"
    assert "decoding failed" in caught.value.detail


def test_truncated_uncompressed_pixel_data_is_reported_as_truncated():
    ds = _image(_phantom())
    ds.PixelData = ds.PixelData[:1000]

    with pytest.raises(DicomRejected) as caught:
        to_model_image(ds, 64)

    assert caught.value.reason == "truncated_pixel_data"


def test_colour_image_is_refused_rather_than_converted():
    ds = read_dicom(get_testdata_file("SC_rgb.dcm"))

    with pytest.raises(DicomRejected) as caught:
        to_model_image(ds, 64)

    assert caught.value.reason == "unsupported_photometric"


def test_dataset_is_not_modified():
    ds = _image(_phantom(), WindowCenter=2000, WindowWidth=1800)
    before = {elem.keyword: elem.value for elem in ds}

    to_model_image(ds, 64)

    assert {elem.keyword: elem.value for elem in ds} == before


@pytest.mark.parametrize("size", [8, 224.0, True])
def test_bad_size_names_the_value_rule_and_fix(size):
    with pytest.raises(InputError, match=r"size: got .*; the model input size must be a whole number >= 16. Fix: use"):
        to_model_image(_image(_phantom()), size)


def test_bad_multiframe_policy_is_an_input_error():
    with pytest.raises(InputError, match="multiframe: got 'all'; it must be one of reject, first"):
        to_model_image(_image(_phantom()), 64, multiframe="all")


def test_preprocessing_version_is_pinned():
    # Changing the pixels for the same input means a new version: caches and models depend on it.
    assert PREPROCESSING_VERSION == "cxr-pixels-1"
