"""densetriton.images: reading awkward files as upright RGB, preprocessing, top-k."""

import os
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from densetriton.images import (
    ImageError,
    build_transform,
    describe_preprocessing,
    is_image_path,
    load_image,
    preprocess,
    probabilities,
    resolve_preprocessing,
    to_rgb,
    topk,
)
from densetriton.stream import collect_files

MEAN = [0.5, 0.4, 0.3]
STD = [0.2, 0.25, 0.3]


@pytest.fixture
def rng(request):
    # A fresh stream per test, seeded by the test's name: random pixels, never blank images.
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_exif_orientation_is_applied(tmp_path, rng):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(_rgb(rng, 30, 48)).save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as raw:
        assert raw.size == (48, 30)
        expected = np.asarray(raw.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (30, 48)
    assert np.array_equal(np.asarray(img), expected)


def test_grayscale_becomes_three_equal_channels(tmp_path, rng):
    gray = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    img = np.asarray(load_image(tmp_path / "g.png"))
    assert img.shape == (20, 24, 3)
    for c in range(3):
        assert np.array_equal(img[..., c], gray)


def test_rgba_is_composited_on_white(tmp_path, rng):
    rgb = _rgb(rng, 16, 18)
    alpha = rng.integers(0, 256, (16, 18), dtype=np.uint8)
    alpha[0, :] = 0  # fully transparent row: white, whatever colour it stores
    alpha[1, :] = 255  # fully opaque row: the colour itself
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    img = np.asarray(load_image(tmp_path / "a.png")).astype(np.int32)
    a = alpha[..., None].astype(np.float64) / 255
    expected = rgb * a + 255 * (1 - a)
    assert np.abs(img - expected).max() <= 1
    assert (img[0] == 255).all()
    assert np.array_equal(img[1], rgb[1])


def test_palette_with_transparency(tmp_path, rng):
    palette_rgb = rng.integers(0, 256, (8, 3), dtype=np.uint8)
    indices = rng.integers(0, 8, (12, 14), dtype=np.uint8)
    indices[0, 0] = 3
    img = Image.fromarray(indices, "P")
    img.putpalette(palette_rgb.flatten().tolist())
    img.save(tmp_path / "p.png", transparency=3)
    out = np.asarray(load_image(tmp_path / "p.png"))
    expected = palette_rgb[indices]
    expected[indices == 3] = 255
    assert np.array_equal(out, expected)

    img.save(tmp_path / "opaque.png")  # no transparent colour: plain palette lookup
    assert np.array_equal(np.asarray(load_image(tmp_path / "opaque.png")), palette_rgb[indices])


def test_cmyk_jpeg(tmp_path, rng):
    cmyk = rng.integers(0, 256, (20, 22, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as raw:
        assert raw.mode == "CMYK"
        expected = np.asarray(raw.convert("RGB"))
    out = load_image(tmp_path / "c.jpg")
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), expected)
    assert expected.std() > 10  # not a degenerate image


def test_16_bit_png_is_scaled_not_clipped(tmp_path, rng):
    deep = rng.integers(0, 65536, (18, 20), dtype=np.uint16)
    deep[0, 0], deep[0, 1], deep[0, 2] = 0, 65535, 257 * 100
    Image.fromarray(deep).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as raw:
        assert raw.mode in ("I;16", "I")  # 16-bit on disk
    out = np.asarray(load_image(tmp_path / "d.png"))
    expected = np.rint(deep / 257).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and out[0, 2, 0] == 100
    assert 100 < out.mean() < 155  # PIL's own conversion clips nearly everything to 255


def test_32_bit_modes(rng):
    wide = rng.integers(-1000, 5000, (6, 7), dtype=np.int32)
    out = np.asarray(to_rgb(Image.fromarray(wide, "I")))[..., 0]
    assert out.min() == 0 and out.max() == 255  # stretched: outside 0..65535
    unit = rng.random((6, 7), dtype=np.float32)
    out = np.asarray(to_rgb(Image.fromarray(unit, "F")))[..., 0]
    assert np.array_equal(out, np.rint(unit.astype(np.float64) * 255).astype(np.uint8))


def test_unreadable_files_raise_image_error_with_a_reason(tmp_path, rng):
    (tmp_path / "noise.jpg").write_bytes(rng.bytes(500))
    (tmp_path / "notes.txt").write_text("not a picture\n")
    buf = tmp_path / "good.jpg"
    Image.fromarray(_rgb(rng, 64, 64)).save(buf, quality=95)
    data = buf.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    cases = {
        "noise.jpg": "not an image",
        "notes.txt": "not an image",
        "truncated.jpg": "corrupt or truncated",
        "missing.png": "file not found",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageError) as info:
            load_image(tmp_path / name)
        assert info.value.reason.startswith(reason), (name, info.value.reason)
        assert name in str(info.value)
    assert load_image(buf).size == (64, 64)


def test_image_suffixes():
    assert is_image_path("a/B.JPG") and is_image_path("x.tiff") and is_image_path("x.png")
    assert is_image_path("scan/IM0001.DCM") and is_image_path("x.dicom")
    assert not is_image_path("notes.txt") and not is_image_path("jpg")


def test_dicom_without_a_suffix_is_found_by_its_marker(tmp_path, rng):
    # PACS exports and DICOMDIR trees name files IM0001 or by UID; the marker tells them apart.
    pixels = rng.integers(0, 4096, (8, 8), dtype=np.uint16)
    for name in ("IM0001", "1.2.840.113619.2.55.3", "IM0004."):
        assert is_image_path(_dicom(tmp_path / name, pixels))
    (tmp_path / "README").write_text("x" * 200)
    (tmp_path / "2.25.1").write_bytes(b"\0" * 128 + b"DICX")
    assert not is_image_path(tmp_path / "README") and not is_image_path(tmp_path / "2.25.1")
    (tmp_path / "scan.bin").write_bytes((tmp_path / "IM0001").read_bytes())
    assert not is_image_path(tmp_path / "scan.bin")  # any other suffix: never opened
    assert not is_image_path(tmp_path / "absent")
    os.mkfifo(tmp_path / "pipe")  # opening it would wait for a writer forever
    assert not is_image_path(tmp_path / "pipe")
    os.mkfifo(tmp_path / "pipe.png")  # picked by name alone, but a folder scan leaves it out
    (tmp_path / "DICOMDIR").write_bytes((tmp_path / "IM0001").read_bytes())  # a tree's index
    assert not is_image_path(tmp_path / "DICOMDIR")
    (tmp_path / "series").mkdir()
    _dicom(tmp_path / "series" / "IM0002", pixels)
    assert collect_files([tmp_path]) == [
        str(tmp_path / n) for n in ("1.2.840.113619.2.55.3", "IM0001", "IM0004.", "series/IM0002")
    ]
    assert all(load_image(f).size == (8, 8) for f in collect_files([tmp_path]))


# -- DICOM ----------------------------------------------------------------------------------------


def _dicom(path, pixels, photometric="MONOCHROME2", bits_stored=None, signed=False, **attributes):
    """A DICOM Part 10 file written with pydicom, uncompressed unless told otherwise."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = attributes.pop("transfer_syntax", ExplicitVRLittleEndian)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = attributes.get("PixelData", pixels.tobytes())
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    return path


def _linear_window(x, center, width):
    """DICOM PS3.3 C.11.2.1.2.1 (VOI LUT function LINEAR) onto 0..255: the test's own oracle."""
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.clip(np.rint(np.where(x <= lo, 0, np.where(x > hi, 255, y))), 0, 255).astype(np.uint8)


def test_dicom_ct_slice_is_rescaled_then_windowed(tmp_path, rng):
    """A 12-bit CT slice: stored values -> Hounsfield units (slope 1, intercept -1024) -> the
    file's window (center 40, width 400) onto 0..255; the suffix need not say DICOM."""
    stored = rng.integers(0, 4096, (40, 52), dtype=np.uint16)
    path = _dicom(
        tmp_path / "IM0001",
        stored,
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
    )
    got = np.asarray(load_image(path))
    assert got.shape == (40, 52, 3) and (got == got[..., :1]).all()  # gray: three equal channels
    expected = _linear_window(stored.astype(np.float64) - 1024, 40, 400)
    assert np.array_equal(got[..., 0], expected)
    assert 0 < (expected == 0).mean() < 1 and 0 < (expected == 255).mean() < 1  # the window clips both ends


def test_dicom_x_ray_without_window_uses_its_range_and_monochrome1_is_inverted(tmp_path, rng):
    stored = rng.integers(100, 3000, (30, 20), dtype=np.uint16)
    expected = np.rint((stored - stored.min()) * (255.0 / (stored.max() - stored.min()))).astype(np.uint8)
    plain = np.asarray(load_image(_dicom(tmp_path / "cxr.dcm", stored, bits_stored=12)))[..., 0]
    assert np.array_equal(plain, expected)
    inverted = np.asarray(load_image(_dicom(tmp_path / "cxr1.dcm", stored, "MONOCHROME1", bits_stored=12)))[..., 0]
    assert np.array_equal(inverted, 255 - expected)  # MONOCHROME1: the lowest value is white


def test_dicom_voi_lut_sequence_is_applied(tmp_path, rng):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    stored = rng.integers(0, 256, (12, 14), dtype=np.uint16)
    lut = (4095 - 16 * np.arange(256)).astype(np.uint16)  # a decreasing 12-bit LUT over stored 0..255
    item = Dataset()
    item.LUTDescriptor = [256, 0, 12]
    item.LUTData = lut.tobytes()  # OW: 16-bit words
    path = _dicom(tmp_path / "lut.dcm", stored, bits_stored=8, VOILUTSequence=[item])
    expected = np.rint(lut[stored] * (255.0 / 4095)).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(path))[..., 0], expected)


def test_dicom_rgb_and_multiframe(tmp_path, rng):
    rgb = _rgb(rng, 16, 24)
    assert np.array_equal(np.asarray(load_image(_dicom(tmp_path / "photo.dcm", rgb, "RGB"))), rgb)
    frames = rng.integers(0, 256, (3, 10, 12), dtype=np.uint8)
    path = _dicom(tmp_path / "cine.dcm", frames[0], NumberOfFrames=3, PixelData=frames.tobytes())
    first = frames[0].astype(np.float64)
    expected = np.rint((first - first.min()) * (255.0 / (first.max() - first.min()))).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(path))[..., 0], expected)


def test_unreadable_dicom_files_raise_image_error_with_a_reason(tmp_path, rng):
    pytest.importorskip("pydicom")
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    stored = rng.integers(0, 4096, (8, 8), dtype=np.uint16)
    compressed = _dicom(
        tmp_path / "j2k.dcm",
        stored,
        bits_stored=12,
        transfer_syntax=JPEG2000Lossless,
        PixelData=encapsulate([rng.bytes(64)]),
    )
    (tmp_path / "text.dcm").write_text("not a DICOM file\n")
    good = _dicom(tmp_path / "good.dcm", stored, bits_stored=12).read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(good[:200])
    cases = {
        "j2k.dcm": "DICOM pixel data (JPEG 2000",
        "text.dcm": "not a DICOM file",
        "truncated.dcm": "corrupt or truncated DICOM file",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageError) as info:
            load_image(tmp_path / name)
        assert info.value.reason.startswith(reason), (name, info.value.reason)
        assert "\n" not in info.value.reason  # one line in the skipped-files summary
    assert compressed.exists()


def test_dicom_edge_cases_viewers_handle(tmp_path, rng):
    """Padding outside the body, an invalid window, a wide 8-bit VOI LUT, 12 bits in a 16-bit RGB
    word, and a dataset written without the Part 10 preamble."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    stored = rng.integers(100, 3000, (20, 24), dtype=np.uint16)
    stored[:4] = 0  # the padding value: air outside the field of view
    body = stored[4:].astype(np.float64)
    expected = np.rint((stored - body.min()) * (255.0 / (body.max() - body.min()))).clip(0, 255).astype(np.uint8)
    expected[:4] = 0
    padded = np.asarray(
        load_image(_dicom(tmp_path / "pad.dcm", stored, "MONOCHROME1", bits_stored=12, PixelPaddingValue=0))
    )[..., 0]
    assert np.array_equal(padded[4:], 255 - expected[4:]) and (padded[:4] == 0).all()  # padding black, inverted or not

    bad_window = np.asarray(
        load_image(_dicom(tmp_path / "w0.dcm", stored, bits_stored=12, WindowCenter=100, WindowWidth=0))
    )[..., 0]
    full = np.rint((stored - float(stored.min())) * (255.0 / (stored.max() - stored.min()))).astype(np.uint8)
    assert np.array_equal(bad_window, full)  # a zero width: the full range, as a viewer falls back

    wide = rng.integers(0, 4096, (12, 12), dtype=np.uint16)
    lut = rng.integers(0, 256, 4096).astype(np.uint16)  # 8-bit entries, 4096 of them
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = lut.tobytes()
    got = np.asarray(load_image(_dicom(tmp_path / "lut8.dcm", wide, bits_stored=12, VOILUTSequence=[item])))[..., 0]
    assert np.array_equal(got, np.rint(lut[wide] * (255.0 / lut.max())).astype(np.uint8))

    rgb12 = rng.integers(0, 4096, (6, 8, 3), dtype=np.uint16)
    got = np.asarray(load_image(_dicom(tmp_path / "rgb12.dcm", rgb12, "RGB", bits_stored=12)))
    assert np.array_equal(got, np.rint(rgb12 * (255.0 / 4095)).astype(np.uint8))

    path = _dicom(tmp_path / "full.dcm", stored, bits_stored=12)
    raw = pydicom.dcmread(path)
    with open(tmp_path / "raw.dcm", "wb") as f:  # no preamble, no file meta: implicit VR little endian
        pydicom.filewriter.write_dataset(pydicom.filebase.DicomFileLike(f), raw, True)
    assert np.array_equal(np.asarray(load_image(tmp_path / "raw.dcm"))[..., 0], np.asarray(load_image(path))[..., 0])


def test_preprocess_crop_and_normalise_exactly(rng):
    """Crop-only preprocessing checked against numpy slicing: the order and the arithmetic."""
    pixels = _rgb(rng, 40, 48)
    pre = {"resize_size": None, "crop_size": 32, "mean": MEAN, "std": STD}
    x = preprocess(Image.fromarray(pixels), pre)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    crop = pixels[4:36, 8:40].astype(np.float32) / 255
    expected = (crop - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_preprocess_resizes_the_shorter_side_then_crops(tmp_path, rng):
    pre = {"resize_size": 40, "crop_size": 32, "mean": MEAN, "std": STD}
    a, b = Image.fromarray(_rgb(rng, 50, 90)), Image.fromarray(_rgb(rng, 120, 60))
    b.save(tmp_path / "b.png")
    x = preprocess([a, tmp_path / "b.png"], pre)
    assert x.shape == (2, 3, 32, 32)
    # the same as torchvision's transforms applied by hand
    from torchvision import transforms

    manual = transforms.Compose(
        [transforms.Resize(40), transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    assert torch.equal(x[0], manual(a)) and torch.equal(x[1], manual(b))
    assert not torch.equal(x[0], x[1])


def test_preprocess_without_crop_needs_equal_sizes(rng):
    images = [Image.fromarray(_rgb(rng, 20, 20)), Image.fromarray(_rgb(rng, 24, 20))]
    with pytest.raises(ValueError, match="different sizes"):
        preprocess(images, None)
    x = preprocess(images[0], None)  # no preprocessing: own size, ImageNet mean/std
    assert x.shape == (1, 3, 20, 20)
    pre = resolve_preprocessing(None)
    assert pre["resize_size"] is None and pre["crop_size"] is None and pre["mean"] == [0.485, 0.456, 0.406]
    assert len(build_transform(None).transforms) == 2


def test_preprocess_converts_pil_modes(rng):
    rgba = Image.fromarray(np.dstack([_rgb(rng, 8, 8), np.full((8, 8), 255, np.uint8)]), "RGBA")
    rgb = rgba.convert("RGB")
    pre = {"resize_size": None, "crop_size": None, "mean": MEAN, "std": STD}
    assert torch.equal(preprocess(rgba, pre), preprocess(rgb, pre))


def test_one_channel_preprocessing_takes_the_luminance(rng):
    """A grayscale model's batch: ITU-R 601 luminance of the RGB image, then its own mean and std;
    a gray image passes through unchanged."""
    pixels = _rgb(rng, 20, 24)
    pre = {"resize_size": None, "crop_size": None, "mean": [0.45], "std": [0.2]}
    x = preprocess(Image.fromarray(pixels), pre)
    assert x.shape == (1, 1, 20, 24)
    luma = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(x[0, 0].numpy() * 0.2 + 0.45 - luma / 255).max() < 1.5 / 255  # PIL rounds to 8 bits
    gray = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    x = preprocess(Image.fromarray(gray), pre)
    assert np.allclose(x[0, 0].numpy(), (gray.astype(np.float32) / 255 - 0.45) / 0.2, atol=1e-6)
    assert "grayscale" in describe_preprocessing(pre)


@pytest.mark.parametrize(
    "pre,match",
    [
        ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, "1 \\(grayscale\\) or 3 \\(RGB\\)"),
        ({"mean": [0.5], "std": [0.2, 0.2, 0.2]}, "std .* is not 1 number"),
        ({"mean": 0.5, "std": 0.2}, "1 \\(grayscale\\) or 3 \\(RGB\\)"),
    ],
)
def test_preprocessing_of_another_channel_count_is_refused(rng, pre, match):
    with pytest.raises(ValueError, match=match):
        preprocess(Image.fromarray(_rgb(rng, 8, 8)), pre)


def test_topk_softmax_and_names():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 4.0]])
    probs = torch.softmax(logits, dim=1)
    out = topk(logits, 2, ["cat", "dog", "eel"])
    assert [n for n, _ in out[0]] == ["dog", "eel"] and [n for n, _ in out[1]] == ["eel", "cat"]
    assert out[0][0][1] == probs[0, 1].item() and out[1][1][1] == probs[1, 0].item()
    assert [n for n, _ in topk(logits, 10, None)[0]] == ["1", "2", "0"]  # k capped, indices as names
    single = topk(logits[1], 1, ["cat", "dog", "eel"])
    assert single == [[("eel", probs[1, 2].item())]]


def test_topk_multi_label_uses_a_sigmoid_per_class():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = topk(logits, 4, ["a", "b", "c", "d"], multi_label=True)[0]
    assert [n for n, _ in out] == ["d", "a", "c", "b"]
    assert [p for _, p in out] == torch.sigmoid(logits)[0, [3, 0, 2, 1]].tolist()
    assert sum(p for _, p in out) > 1.5  # independent, not a distribution


def _xrv_op_norm(p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """torchxrayvision's op_norm, restated in numpy: the test's own oracle."""
    t = np.broadcast_to(thresholds, p.shape)
    out = np.full(p.shape, 0.5)
    below = (p < t) & ~np.isnan(t)
    above = ~(p < t) & ~np.isnan(t)
    out[below] = p[below] / (t[below] * 2)
    out[above] = 1 - ((1 - p[above]) / ((1 - t[above]) * 2))
    return out


def test_operating_points_put_each_class_threshold_at_one_half():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 5, generator=g) * 4
    points = [0.039, None, 0.5, 0.9, 0.0004]
    got = probabilities(logits, multi_label=True, operating_points=points)
    p = torch.sigmoid(logits).double().numpy()
    expected = _xrv_op_norm(p, np.array([np.nan if v is None else v for v in points]))
    assert np.abs(got.double().numpy() - expected).max() < 1e-6
    assert (got[:, 1] == 0.5).all()  # no operating point: torchxrayvision's untrained output
    at_threshold = torch.logit(torch.tensor([[0.039, 0.5, 0.5, 0.9, 0.0004]], dtype=torch.float64)).float()
    assert torch.allclose(probabilities(at_threshold, True, points)[0, [0, 2, 3, 4]], torch.tensor(0.5), atol=1e-5)
    # Order within each class is kept; a softmax ignores operating points.
    assert (got[:, 0].argsort() == torch.sigmoid(logits[:, 0]).argsort()).all()
    assert torch.equal(probabilities(logits, False, points), torch.softmax(logits, 1))
    top = topk(logits[:1], 5, list("abcde"), multi_label=True, operating_points=points)[0]
    assert sorted(p for _, p in top) == sorted(got[0].tolist())
    with pytest.raises(ValueError, match="2 operating points for 5 classes"):
        probabilities(logits, True, [0.1, 0.2])


def test_topk_errors():
    with pytest.raises(ValueError, match="class names"):
        topk(torch.zeros(1, 3), 1, ["a", "b"])
    with pytest.raises(ValueError, match="at least 1"):
        topk(torch.zeros(1, 3), 0)
