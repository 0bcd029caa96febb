"""The batched tensor decode path (densetriton.decode, --decode gpu) against the Pillow path.

On the CPU the tensor path runs with device="cpu" (torchvision's libjpeg-turbo and v2 functional
on CPU tensors); the `gpu`-marked tests run the same checks with nvJPEG on CUDA.
"""

import zlib

import numpy as np
import pytest
import torch
from image_commands import PRE, common, engine, make_images, read_csv, run_cli, weights  # noqa: F401
from PIL import Image

import densetriton
import densetriton.decode as decode
from densetriton.decode import (
    EncodedImages,
    TensorPreprocess,
    collate_encoded,
    decode_batch,
    decode_jpegs,
    orient,
    use_tensor_decoding,
)
from densetriton.images import build_transform, load_image

# Largest difference of one preprocessed pixel (0..1 scale, before mean/std) between the two paths:
# both decode with libjpeg-turbo's defaults (identical pixels on CPU), then Pillow's and
# torchvision's antialiased bilinear resizes round differently by at most a few levels of 255.
PIXEL_BOUND = 3 / 255
# nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a looser bound, not yet measured on a GPU.
GPU_PIXEL_BOUND = 12 / 255
GPU_MEAN_BOUND = 1 / 255
MEAN_BOUND = 0.1 / 255  # the mean absolute difference over all pixels (measured: 0.05 levels)


def _rng(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


def _photo(rng, h, w) -> np.ndarray:
    """A photo-like image: smooth colour fields (upsampled coarse noise) plus fine grain."""
    coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (h, w, 3))
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def _save_jpeg(path, pixels, orientation=1, **kw):
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, "JPEG", quality=90, exif=exif.tobytes(), **kw)
    return str(path)


def _tensor_path(paths, pre_dict, device="cpu"):
    """What --decode gpu computes for these JPEG paths: [N, C, h, w] float32 on the CPU."""
    dataset = EncodedImages(list(enumerate(paths)), build_transform(pre_dict), pre_dict)
    jpegs, pillow, failed = collate_encoded([dataset[i] for i in range(len(paths))])
    assert not pillow and not failed, (pillow, failed)  # every one took the tensor path
    pre = TensorPreprocess(pre_dict, device)
    prepared, fallen, refused = decode_batch(jpegs, pre, fallback=None)
    assert not fallen and not refused
    return pre.batch([img for _, _, img in prepared]).cpu()


def _pillow_path(paths, pre_dict):
    transform = build_transform(pre_dict)
    return torch.stack([transform(load_image(p)) for p in paths])


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """200 JPEGs: sizes from 41 to 260 pixels a side, aspect ratios 1:3 to 3:1, all 8 orientations."""
    folder = tmp_path_factory.mktemp("varied")
    rng = _rng("varied")
    paths = []
    for i in range(200):
        short = int(rng.integers(41, 130))
        long = int(short * rng.uniform(1.0, 3.0))
        h, w = (short, long) if i % 2 else (long, short)
        paths.append(_save_jpeg(folder / f"{i:03d}.jpg", _photo(rng, h, w), orientation=1 + i % 8))
    return paths


def test_orientation_matches_pillow(tmp_path):
    """Each EXIF orientation turns the decoded tensor as load_image turns the image (fails with any
    two of orient's cases swapped, or with the orientation not read)."""
    rng = _rng("orient")
    pixels = _photo(rng, 24, 40)
    for orientation in range(1, 9):
        path = _save_jpeg(tmp_path / f"o{orientation}.jpg", pixels, orientation)
        data, header = open(path, "rb").read(), decode.jpeg_header(path, open(path, "rb").read())
        assert header[2] == orientation
        img = orient(
            decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], torch.device("cpu"))[0], orientation
        )
        expected = torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1)
        assert img.shape == expected.shape, orientation
        assert torch.equal(img, expected), orientation  # the same libjpeg-turbo decode: identical pixels
        assert header[:2] == (expected.shape[2], expected.shape[1])  # upright width, height from the header


@pytest.mark.parametrize(
    "pre_dict",
    [
        PRE,  # shorter side 40, center crop 32
        {"resize_size": [36, 28], "crop_size": None, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},  # exact HxW
        {"resize_size": 40, "crop_size": 32, "mean": [0.45], "std": [0.22]},  # a grayscale model: luminance
    ],
    ids=["shorter-side-crop", "exact-size", "grayscale"],
)
def test_tensor_path_matches_pillow(varied, pre_dict):
    """The bound stated in docs/images.md (fails with the resize's antialias off, a channel order
    swapped, the wrong luminance weights or mean/std not applied)."""
    ours, theirs = _tensor_path(varied, pre_dict), _pillow_path(varied, pre_dict)
    assert ours.shape == theirs.shape
    std = torch.tensor(pre_dict["std"]).view(1, -1, 1, 1)
    diff = ((ours - theirs) * std).abs()  # back on the 0..1 pixel scale
    assert diff.max().item() <= PIXEL_BOUND, diff.max().item() * 255
    assert diff.mean().item() <= MEAN_BOUND, diff.mean().item() * 255


def test_same_top1(varied, engine):
    """Identical top-1 on at least 99% of the varied images (a random-weights model)."""
    ours, theirs = engine(_tensor_path(varied, PRE)), engine(_pillow_path(varied, PRE))
    agree = (ours.argmax(1) == theirs.argmax(1)).double().mean().item()
    assert agree >= 0.99, agree


def test_grayscale_jpeg_takes_the_tensor_path(tmp_path):
    """A grayscale JPEG (an X-ray) is decoded by the tensor path, to the pixels load_image gives
    (fails with "L" left out of the tensor decoder's modes)."""
    path = str(tmp_path / "xray.jpg")
    Image.fromarray(_photo(_rng("xray"), 50, 40)[:, :, 1]).save(path, quality=90)
    _, _, data, orientation, tensor, reason = EncodedImages([(0, path)], build_transform(PRE), PRE)[0]
    assert data is not None and tensor is None and reason is None
    img = decode_jpegs([data], torch.device("cpu"))[0]
    assert torch.equal(img, torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1))


def test_declared_size_refused_before_decoding(tmp_path, monkeypatch):
    """A JPEG over DENSETRITON_MAX_IMAGE_PIXELS is refused from its SOF header in the worker: no
    bytes are handed to the decoder (fails without jpeg_header's check)."""
    path = _save_jpeg(tmp_path / "big.jpg", _photo(_rng("big"), 120, 100))
    monkeypatch.setenv("DENSETRITON_MAX_IMAGE_PIXELS", "10000")
    index, _, data, _, tensor, reason = EncodedImages([(0, path)], build_transform(PRE), PRE)[0]
    assert data is None and tensor is None
    assert "declares 100x120 = 12,000 pixels" in reason


def test_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [use_tensor_decoding(c, cpu) for c in ("auto", "gpu", "cpu")] == [False, True, False]
    assert [use_tensor_decoding(c, cuda) for c in ("auto", "gpu", "cpu")] == [True, True, False]


def _mixed_folder(folder):
    """make_images' awkward kinds plus JPEGs the tensor path takes, a truncated one, a grayscale and
    a progressive one."""
    kinds = make_images(folder, "decode")
    rng = _rng("mixed")
    for i in range(5):
        kinds[f"jpeg{i}"] = _save_jpeg(
            folder / f"j{i}.jpg", _photo(rng, 50 + 9 * i, 64), orientation=(1, 6, 3, 8, 1)[i]
        )
    data = open(kinds["jpeg4"], "rb").read()
    (folder / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    kinds["truncated"] = str(folder / "truncated.jpg")
    Image.fromarray(_photo(rng, 40, 44)[:, :, 0]).save(folder / "gray.jpg", quality=90)
    kinds["progressive"] = _save_jpeg(folder / "progressive.jpg", _photo(rng, 52, 40), progressive=True)
    return kinds


def test_predict_gpu_decode_matches_cpu_decode(tmp_path, weights, capsys, monkeypatch):  # noqa: F811
    """predict --decode gpu (tensor path on the CPU device) against --decode cpu over a mixed
    folder, 3 images a batch: the same rows in the same order, the same labels, the same skipped
    files; a JPEG the decoder refuses (j2.jpg, refused by a patched decoder) falls back to Pillow
    inside its batch, and the truncated JPEG is skipped with Pillow's reason."""
    folder = tmp_path / "mixed"
    _mixed_folder(folder)
    import torchvision.io

    real_decode, refused = torchvision.io.decode_jpeg, []

    def picky(datas, **kw):  # refuses the batch that holds j2.jpg, and j2.jpg alone
        if any(bytes(d[-64:].tolist()) == open(folder / "j2.jpg", "rb").read()[-64:] for d in datas):
            refused.append(len(datas))
            raise RuntimeError("unsupported JPEG")
        return real_decode(datas, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    outs = {}
    for mode in ("cpu", "gpu"):
        rc, _, err = run_cli(
            capsys,
            "predict",
            folder,
            *common(
                weights, "--decode", mode, "--batch-size", "3", "--workers", "0", "--out", tmp_path / f"{mode}.csv"
            ),
        )
        assert rc == 0, err
        outs[mode] = (read_csv(tmp_path / f"{mode}.csv"), err)
    assert refused and refused[-1] == 1  # the batch call failed, then j2.jpg alone
    (cpu_rows, cpu_err), (gpu_rows, gpu_err) = outs["cpu"], outs["gpu"]
    assert [p for p, _ in gpu_rows] == [p for p, _ in cpu_rows]
    assert any(p.endswith("j2.jpg") for p, _ in gpu_rows)
    for (path, ours), (_, theirs) in zip(gpu_rows, cpu_rows):
        assert ours[0][0] == theirs[0][0], path
    assert "truncated.jpg: corrupt or truncated image" in gpu_err
    assert gpu_err.split("skipped", 1)[1].split("results:")[0] == cpu_err.split("skipped", 1)[1].split("results:")[0]


def test_next_batch_prepared_before_outputs_are_read(tmp_path, weights, monkeypatch):  # noqa: F811
    """Overlap: batch k+1 is decoded before batch k's rows are handed over, and the model is called
    for k+1 only after that (fails with the loop preparing and finishing each batch in turn)."""
    from densetriton import stream

    folder = tmp_path / "pipe"
    folder.mkdir()
    rng = _rng("pipe")
    paths = [_save_jpeg(folder / f"{i}.jpg", _photo(rng, 48, 48)) for i in range(7)]
    events = []
    real_decode_batch = decode.decode_batch

    def traced(jpegs, *a, **kw):
        events.append(("decode", jpegs[0][0]))
        return real_decode_batch(jpegs, *a, **kw)

    monkeypatch.setattr(decode, "decode_batch", traced)
    engine = densetriton.load(weights, device="cpu", backend="reference")

    def run(x):
        events.append(("run", len(x)))
        return engine(x)

    args = type("Args", (), {"batch_size": 3, "workers": 0, "decode": "gpu"})()
    tally = stream.stream_images(
        engine,
        list(enumerate(paths)),
        args,
        run=run,
        on_batch=lambda rows: events.append(("rows", rows[0][0])),
        desc="t",
        show=False,
    )
    assert tally.done == 7
    assert events == [
        ("decode", 0),
        ("run", 3),
        ("decode", 3),
        ("rows", 0),
        ("run", 3),
        ("decode", 6),
        ("rows", 3),
        ("run", 1),
        ("rows", 6),
    ]


@pytest.mark.gpu
def test_cuda_tensor_path_matches_pillow(varied, weights):  # noqa: F811
    """nvJPEG on CUDA: the pixel bound (GPU_PIXEL_BOUND) and identical top-1 on >= 99%."""
    cuda_engine = densetriton.load(weights, device="cuda", backend="reference", dtype="float32")
    ours = _tensor_path(varied, PRE, device="cuda")
    theirs = _pillow_path(varied, PRE)
    std = torch.tensor(PRE["std"]).view(1, -1, 1, 1)
    diff = ((ours - theirs) * std).abs()
    print(f"nvJPEG path against Pillow: max {diff.max().item() * 255:.2f}/255, mean {diff.mean().item() * 255:.3f}/255")
    assert diff.max().item() <= GPU_PIXEL_BOUND, diff.max().item() * 255
    assert diff.mean().item() <= GPU_MEAN_BOUND, diff.mean().item() * 255
    agree = (cuda_engine(ours.cuda()).argmax(1) == cuda_engine(theirs.cuda()).argmax(1)).double().mean().item()
    assert agree >= 0.99, agree


@pytest.mark.gpu
def test_cuda_predict_gpu_decode(tmp_path, weights, capsys):  # noqa: F811
    """predict --decode gpu on CUDA over the mixed folder: the same rows, order and skipped files
    as --decode cpu, top-1 equal."""
    folder = tmp_path / "mixed"
    _mixed_folder(folder)
    rows = {}
    for mode in ("cpu", "gpu"):
        rc, _, err = run_cli(
            capsys,
            "predict",
            folder,
            "--weights",
            weights,
            "--device",
            "cuda",
            "--dtype",
            "float32",
            "--backend",
            "reference",
            "--decode",
            mode,
            "--batch-size",
            "3",
            "--workers",
            "2",
            "--out",
            tmp_path / f"{mode}.csv",
        )
        assert rc == 0, err
        rows[mode] = read_csv(tmp_path / f"{mode}.csv")
    assert [p for p, _ in rows["gpu"]] == [p for p, _ in rows["cpu"]]
    assert [t[0][0] for _, t in rows["gpu"]] == [t[0][0] for _, t in rows["cpu"]]


def test_embed_gpu_decode_in_a_worker(tmp_path, weights, capsys):  # noqa: F811
    """embed --decode gpu with a DataLoader worker (the bytes cross a process): the same paths, in
    order, and features within 2% of --decode cpu's (the resizes' rounding)."""
    folder = tmp_path / "jpegs"
    folder.mkdir()
    rng = _rng("embed")
    for i in range(5):
        _save_jpeg(folder / f"{i}.jpg", _photo(rng, 60 + 7 * i, 50), orientation=(1, 6, 8, 3, 1)[i])
    feats = {}
    for mode in ("cpu", "gpu"):
        out = tmp_path / f"{mode}.npy"
        rc, _, err = run_cli(
            capsys,
            "embed",
            folder,
            *common(weights, "--decode", mode, "--batch-size", "2", "--workers", "1", "--out", out),
        )
        assert rc == 0, err
        feats[mode] = (np.load(out), (tmp_path / f"{mode}.npy.paths.txt").read_text())
    assert feats["gpu"][1] == feats["cpu"][1]
    ours, theirs = feats["gpu"][0], feats["cpu"][0]
    assert np.linalg.norm(ours - theirs, axis=1).max() <= 0.02 * np.linalg.norm(theirs, axis=1).min()


def test_images_of_one_size_are_resized_together(tmp_path, monkeypatch):
    """Six JPEGs of two stored sizes, turned by EXIF into two upright sizes: two resize calls, not
    six, and each image exactly as it comes out alone (fails without preprocess_decoded's grouping)."""
    rng = _rng("together")
    paths = [
        _save_jpeg(tmp_path / f"{i}.jpg", _photo(rng, *((48, 64), (64, 48))[i % 2]), orientation=(1, 1, 6, 1, 1, 8)[i])
        for i in range(6)
    ]
    dataset = EncodedImages(list(enumerate(paths)), build_transform(PRE), PRE)
    jpegs, _, _ = collate_encoded([dataset[i] for i in range(6)])
    pre = TensorPreprocess(PRE, "cpu")
    calls, real_image = [], pre.image
    monkeypatch.setattr(pre, "image", lambda img: calls.append(tuple(img.shape)) or real_image(img))
    prepared, _, _ = decode_batch(jpegs, pre, fallback=None)
    assert sorted(calls) == [(3, 3, 48, 64), (3, 3, 64, 48)]
    for (_, _, data, orientation), (_, _, img) in zip(jpegs, prepared):
        alone = real_image(orient(decode_jpegs([data], torch.device("cpu"))[0], orientation))
        assert torch.equal(img, alone)
    monkeypatch.setattr(decode, "RESIZE_CHUNK", 2)  # at most two a call: 2 + 1 of each size
    calls.clear()
    again, _, _ = decode_batch(jpegs, pre, fallback=None)
    assert sorted(c[0] for c in calls) == [1, 1, 2, 2]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(again, prepared))
