"""Hostile weights files and images (issue 22): a small file that declares a huge spec, deep JSON,
a huge header, huge preprocessing sizes or an image of billions of pixels is refused at once --
one error line (exit status 2 from `densetriton info`), within 10 s and 1 GB, nothing written --
and a hostile image in a folder is skipped with its reason while the others are classified.

Every file is generated here, in tmp_path; the command-line cases run in a child process
(tests/hostile.py) so that their peak memory and time can be measured.
"""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hostile import MEMORY_BOUND_MB, TIME_BOUND_S, WALL_BOUND_S, assert_refused, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from image_commands import NAMES, PRE, SPEC, one_thread, weights  # noqa: F401 -- fixtures by name
from PIL import Image

import densetriton
from densetriton.engine import random_weights
from densetriton.images import ImageError, build_transform, load_image
from densetriton.limits import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    FileRefused,
    json_depth,
)
from densetriton.weights import WeightsError, load_weights, save_weights

# -- hostile weights files --------------------------------------------------------------------------


def _densetriton_file(path, **metadata):
    """A safetensors file with densetriton's metadata (spec {} is densenet121's defaults) and one small
    random tensor: what a spec declares is never held."""
    from safetensors.torch import save_file

    metadata = {"format": "densetriton", "format_version": "1", "spec": "{}", **metadata}
    save_file({"x": torch.rand(3)}, str(path), metadata=metadata)
    return path


def _huge_header(path):
    """A header length of 70 MB that the (sparse) file holds: refused from its first 8 bytes."""
    declared = MAX_JSON_BYTES + (6 << 20)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", declared) + b"{")
        f.truncate(8 + declared)
    return path


# name: (metadata of the file, what the refusal must name). Each allocates gigabytes, recurses past
# Python's limit or loops for minutes without its bound.
HOSTILE_SPECS = {
    "layers_1e9": (
        dict(spec=json.dumps({"block_config": [1e9]})),
        "block_config[0] (the layers of block 1) is 1000000000",
    ),
    "blocks_100000": (
        dict(spec=json.dumps({"block_config": [1] * 100_000})),
        "len(block_config) (the number of blocks) is 100000",
    ),
    "growth_rate": (dict(spec=json.dumps({"growth_rate": 10**9})), "growth_rate is 1000000000"),
    "classes": (dict(spec=json.dumps({"num_classes": 10**12})), "num_classes is 1000000000000"),
    "block_channels": (
        dict(spec=json.dumps({"growth_rate": 60000, "block_config": [2], "bn_size": None})),
        "channels at the end of block 1",
    ),
    "bottleneck": (dict(spec=json.dumps({"bn_size": 4096})), "bn_size x growth_rate (the bottleneck width) is 131072"),
    "deep_spec": (
        dict(spec="[" * 200_000 + "]" * 200_000),
        f"spec nesting depth is 200000, over the bound of {MAX_JSON_DEPTH}",
    ),
    "deep_class_names": (dict(class_names="[" * 100_000), "class_names nesting depth is 100000"),
    "resize_20000": (dict(preprocessing=json.dumps({**PRE, "resize_size": 20000})), "resize_size is 20000"),
    "crop_20000": (
        dict(preprocessing=json.dumps({**PRE, "resize_size": None, "crop_size": [20000, 224]})),
        "crop_size is 20000",
    ),
}
# The cases also run as `densetriton info FILE` in a child (each child costs a few seconds of imports).
CLI_CASES = ["layers_1e9", "blocks_100000", "deep_spec", "resize_20000", "huge_header", "many_tensors"]


def _many_empty_tensors(path):
    """600,000 empty tensors in a 34 MB header: without the tensor count bound `info` peaked at
    1,039 MB while safetensors parsed the header."""
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(600_000)}
    header["__metadata__"] = {"format": "densetriton", "format_version": "1", "spec": "{}"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    return path


def _hostile_file(folder, name):
    path = folder / f"{name}.safetensors"
    if name == "huge_header":
        return _huge_header(path), "its safetensors header length is 73400320 bytes"
    if name == "many_tensors":
        return _many_empty_tensors(path), "the tensor count is 600000"
    metadata, mentions = HOSTILE_SPECS[name]
    return _densetriton_file(path, **metadata), mentions


@pytest.mark.parametrize("name", [*HOSTILE_SPECS, "huge_header", "many_tensors"])
def test_hostile_weights_files_are_refused_by_load(tmp_path, name):
    """load_weights and densetriton.load: a FileRefused (a ValueError) naming the file, what it declared
    and the bound, before anything is allocated. Without the spec bounds the first cases take gigabytes
    or minutes; without the JSON bounds the deep cases are a RecursionError; without the header bound
    the huge header is read (a WeightsError, not a refusal); without MAX_IMAGE_SIDE the sizes load."""
    path, mentions = _hostile_file(tmp_path, name)
    for load in (load_weights, lambda p: densetriton.load(p, device="cpu", backend="reference")):
        with pytest.raises(FileRefused) as refused:
            load(path)
        message = str(refused.value)
        assert message.startswith(f"{path}: refused: ") and mentions in message and "over the bound of" in message
        assert "\n" not in message


@pytest.mark.parametrize("name", CLI_CASES)
def test_hostile_weights_files_are_refused_by_info(tmp_path, name):
    """`densetriton info FILE` in a child: exit status 2, one line, under 10 s and 1 GB, nothing written."""
    path, mentions = _hostile_file(tmp_path, name)
    before = sorted(tmp_path.iterdir())
    run = run_cli("info", str(path), timeout=60)
    assert_refused(run, mentions=mentions)
    assert run.stdout == "" and sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    "metadata,match",
    [
        (dict(spec=json.dumps({"block_config": {"a": 1}})), "block_config must be a sequence of layer counts"),
        (dict(spec=json.dumps({"block_config": [[6]]})), "block_config must be whole numbers"),
        (dict(spec=json.dumps({"block_config": [6.5]})), "block_config must be whole numbers"),
        (dict(spec=json.dumps({"growth_rate": [32]})), "growth_rate must be a positive int"),
        (dict(spec=json.dumps({"compression": {}})), "compression"),
        (dict(spec=json.dumps({"stem": ["imagenet"]})), "stem must be one of"),
        (dict(spec="null"), "a DenseNetSpec is a JSON object"),
        (dict(spec="[1, 2]"), "a DenseNetSpec is a JSON object"),
        (dict(preprocessing=json.dumps({**PRE, "std": [0.2, "x", 0.3]})), "std"),
    ],
)
def test_malformed_metadata_is_one_clear_error(tmp_path, metadata, match):
    """Metadata of the wrong types is a WeightsError of one line, not a TypeError or AttributeError
    from deep inside the reader (the spec's block_config used to be converted with int(), which
    truncated 6.5 and took a dict's keys)."""
    path = _densetriton_file(tmp_path / "bad.safetensors", **metadata)
    with pytest.raises(WeightsError, match=match) as error:
        load_weights(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_declarations_past_the_end_of_a_safetensors_file_are_refused_by_safetensors(tmp_path):
    """safetensors itself checks a header length and tensor offsets against the file's size before it
    reads them: a header of 1 TB, or a tensor of 4 GB, declared by a file of a few bytes is one error."""
    past_end = tmp_path / "header_past_end.safetensors"
    past_end.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    header = json.dumps({"x": {"dtype": "F32", "shape": [1_000_000_000], "data_offsets": [0, 4_000_000_000]}}).encode()
    big_tensor = tmp_path / "tensor_past_end.safetensors"
    big_tensor.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    for path in (past_end, big_tensor):
        with pytest.raises(WeightsError, match="is not a readable safetensors file") as error:
            load_weights(path)
        assert "\n" not in str(error.value)


def test_preprocessing_sides_are_bounded_at_save_and_in_transforms(tmp_path):
    """A resize or crop over MAX_IMAGE_SIDE is refused by save_weights (nothing written) and by
    build_transform, as well as in a file being loaded (above)."""
    out = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    tensors = random_weights(SPEC).tensors
    for pre in ({**PRE, "resize_size": MAX_IMAGE_SIDE + 1}, {**PRE, "resize_size": None, "crop_size": [32, 20000]}):
        with pytest.raises(WeightsError, match=f"over the bound of {MAX_IMAGE_SIDE} pixels a side"):
            save_weights(out, tensors, SPEC, class_names=NAMES, preprocessing=pre)
        assert not out.exists()
        with pytest.raises(WeightsError, match=f"over the bound of {MAX_IMAGE_SIDE}"):
            build_transform(pre)
    at_bound = {**PRE, "resize_size": MAX_IMAGE_SIDE, "crop_size": MAX_IMAGE_SIDE}
    save_weights(out, tensors, SPEC, class_names=NAMES, preprocessing=at_bound)
    assert load_weights(out).preprocessing["resize_size"] == MAX_IMAGE_SIDE


def _reference_depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(_reference_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_reference_depth, value.values()), default=0)
    return 0


# Strings full of brackets, quotes and backslashes: they must not count as nesting.
_tricky_text = st.text(alphabet='[]{}"\\ax', max_size=8)
_json_values = st.recursive(
    st.none() | st.integers() | _tricky_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_tricky_text, inner, max_size=3),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_json_values)
def test_json_depth_counts_nesting_outside_strings(value):
    assert json_depth(json.dumps(value)) == _reference_depth(value)


# -- hostile images ---------------------------------------------------------------------------------


def _png_declaring(path, width, height):
    """A PNG of under 100 bytes whose header declares width x height RGB pixels (four rows of data)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + 3 * min(width, 64)) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def _dicom_declaring(path, rows, columns, pixels: np.ndarray, rle=False):
    """A DICOM file holding `pixels` (uint16, RLE-compressed if asked) whose header then declares
    rows x columns."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    if rle:
        ds.compress(RLELossless)
    ds.Rows, ds.Columns = rows, columns
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).Rows == rows
    return path


def test_hostile_images_are_skipped_by_predict_and_the_others_classified(weights, tmp_path):
    """`densetriton predict` on a folder of one good image and five hostile ones, in a child: the good
    one is classified; each hostile one is skipped with a one-line refusal, under 1 GB (predict itself
    takes ~850 MB). Without the pixel bound, the RLE DICOM of 30000 x 30000 allocates over 1 GB before
    its decoder finds the data short, and the PNGs are not refused (Pillow warns about the 12000 x 12000 one,
    under its own bound of 179 million pixels, then finds it truncated); without ResizeBound the
    1 x 60000 strip is resized to 96 million pixels and classified; without the length check the short
    DICOM is pydicom's error, not a refusal."""
    rng = np.random.default_rng(22)
    folder = tmp_path / "images"
    folder.mkdir()
    good = folder / "good.png"
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(good)
    hostile = {
        "huge.png": _png_declaring(folder / "huge.png", 100_000, 100_000),
        "bomb.png": _png_declaring(folder / "bomb.png", 12_000, 12_000),
        "rle.dcm": _dicom_declaring(folder / "rle.dcm", 30_000, 30_000, rng.integers(0, 4096, (64, 64)), rle=True),
        "short.dcm": _dicom_declaring(folder / "short.dcm", 2_000, 2_000, rng.integers(0, 4096, (16, 16))),
        "strip.png": folder / "strip.png",
    }
    Image.fromarray(rng.integers(0, 256, (60_000, 1, 3), dtype=np.uint8)).save(hostile["strip.png"])
    out = tmp_path / "results.jsonl"
    run = run_cli(
        "predict",
        str(folder),
        "--weights",
        weights,
        "--backend",
        "reference",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--out",
        str(out),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(good)] and rows[0]["topk"][0]["label"] in NAMES
    assert "classified 1 image" in run.stderr and f"skipped {len(hostile)}:" in run.stderr
    reasons = {
        line.split(": ", 1)[0].strip(): line.split(": ", 1)[1]
        for line in run.stderr.splitlines()
        if line.startswith("  " + str(folder))
    }
    assert sorted(reasons) == sorted(str(p) for p in hostile.values()), run.stderr
    for name in ("huge.png", "bomb.png", "rle.dcm"):
        assert reasons[str(hostile[name])].startswith("refused: it declares"), reasons
        assert f"over the bound of {DEFAULT_MAX_IMAGE_PIXELS:,}" in reasons[str(hostile[name])]
    assert reasons[str(hostile["short.dcm"])] == "refused: it declares 8,000,000 bytes of pixel data and holds 512"
    assert "resizing its 1x60000 pixels to resize_size 40 gives 40x2400000" in reasons[str(hostile["strip.png"])]
    assert "warning" not in run.stderr.lower()  # no DecompressionBombWarning before the refusal
    assert run.peak_mb < MEMORY_BOUND_MB, f"peak {run.peak_mb:.0f} MB"
    # startup and the model included
    assert run.cpu_seconds < 3 * TIME_BOUND_S and run.seconds < 3 * WALL_BOUND_S, (run.cpu_seconds, run.seconds)


def test_the_pixel_bound_is_set_by_densetriton_max_image_pixels(tmp_path, monkeypatch):
    """DENSETRITON_MAX_IMAGE_PIXELS lowers and raises the bound, for PIL-read and DICOM files alike, and
    alone decides: with Pillow's own bound set below the image, the image within ours still loads (and
    Pillow's setting is left as it was)."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(7)
    png = tmp_path / "image.png"
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(png)
    dicom = _dicom_declaring(tmp_path / "image.dcm", 20, 30, rng.integers(0, 4096, (20, 30)))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would refuse 600 pixels
    for path in (png, dicom):
        monkeypatch.setenv("DENSETRITON_MAX_IMAGE_PIXELS", "599")
        with pytest.raises(ImageError, match="it declares 30x20 = 600 pixels, over the bound of 599") as refused:
            load_image(path)
        assert refused.value.reason.startswith("refused: ")
        monkeypatch.setenv("DENSETRITON_MAX_IMAGE_PIXELS", "600")
        assert load_image(path).size == (30, 20)
    assert PILImage.MAX_IMAGE_PIXELS == 100
    monkeypatch.delenv("DENSETRITON_MAX_IMAGE_PIXELS")
    with pytest.raises(ImageError, match=f"over the bound of {DEFAULT_MAX_IMAGE_PIXELS:,}"):
        load_image(_png_declaring(tmp_path / "bomb.png", 9000, 9000))
    for malformed in ("lots", "0"):  # refused once, by the transform predict and embed build first
        monkeypatch.setenv("DENSETRITON_MAX_IMAGE_PIXELS", malformed)
        with pytest.raises(ValueError, match="DENSETRITON_MAX_IMAGE_PIXELS must be"):
            build_transform(PRE)


def test_dicom_headers_that_cannot_be_checked_are_one_image_error(tmp_path):
    """A DICOM file whose transfer syntax is no transfer syntax, or whose samples per pixel are not 1
    or 3 (each sample multiplies what a frame allocates), is an ImageError with its reason (predict
    skips it), not a ValueError from pydicom's UID class."""
    from pydicom import dcmread

    rng = np.random.default_rng(3)
    unknown = _dicom_declaring(tmp_path / "unknown.dcm", 8, 8, rng.integers(0, 4096, (8, 8)))
    ds = dcmread(unknown)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4"
    ds.save_as(unknown)
    with pytest.raises(ImageError, match="unreadable attributes"):
        load_image(unknown)
    samples = _dicom_declaring(tmp_path / "samples.dcm", 8, 8, rng.integers(0, 4096, (8, 8)))
    ds = dcmread(samples)
    ds.SamplesPerPixel = 4000
    ds.save_as(samples)
    with pytest.raises(ImageError, match="refused: it declares 4000 samples per pixel"):
        load_image(samples)


def test_a_plain_file_whose_tensors_describe_a_spec_over_the_bounds_is_refused(tmp_path, monkeypatch):
    """A safetensors file without metadata (timm's layout) gets its spec from its tensors' names and
    shapes, and the spec's bounds apply to it too: 17 blocks is a refusal naming the file and the
    bound, whether it is loaded or converted (convert: exit status 2, one line, nothing written; it
    was exit 1 before convert turned the spec's OverBound into a refusal). Fails without the bounds:
    the file loads."""
    from safetensors.torch import save_file

    from densetriton.reference import ReferenceDenseNet

    monkeypatch.setattr(densetriton.spec, "MAX_BLOCKS", 32)  # to build the model the file holds
    spec = densetriton.DenseNetSpec(4, (1,) * 17, 8, 2, 0.5, 3)
    torch.manual_seed(0)
    state = {k: v for k, v in ReferenceDenseNet(spec).state_dict().items() if not k.endswith("num_batches_tracked")}
    monkeypatch.undo()
    path = tmp_path / "plain.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        ValueError, match=r"len\(block_config\) \(the number of blocks\) is 17, over the bound of 16"
    ) as e:
        load_weights(path)
    assert "\n" not in str(e.value) and isinstance(e.value, FileRefused) and str(path) in str(e.value)
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    run = run_cli("convert", "--checkpoint", str(path), "--out", str(out))
    assert_refused(run, mentions="the number of blocks) is 17, over the bound of 16")
    assert str(path) in run.error_lines[0] and not any(out.parent.iterdir())
    # The same tensors handed over in memory: the converter's own error, nothing written.
    from densetriton.weights_tools import ConversionError, convert_state_dict

    with pytest.raises(ConversionError, match=r"cannot infer the architecture: .*is 17, over the bound of 16"):
        convert_state_dict(state, out)
    assert not any(out.parent.iterdir())
