"""Batched JPEG decoding and preprocessing on the model's device, with a per-image Pillow fallback.

`--decode gpu` (predict, embed) takes this path, `--decode cpu` today's one (Pillow decodes and
torchvision's PIL transforms preprocess in DataLoader workers); `--decode auto` is gpu on CUDA.

How a batch goes (stream.stream_images drives it):

* DataLoader workers only read (`EncodedImages`): a JPEG that the tensor decoder takes (Pillow's
  header says JPEG, colour or grayscale) becomes its raw bytes as a uint8 tensor, with the size its
  SOF header declares checked against max_image_pixels() and against the resize bound before
  anything is decoded, and its EXIF orientation read from the bytes (decode_jpeg's
  apply_exif_orientation exists on the CPU only, so both devices turn the tensor themselves).
  Anything else (PNG, a CMYK JPEG, 16-bit, DICOM, a file Pillow cannot identify) goes through
  today's Pillow path in the worker, so the batch carries both kinds.
* The main process decodes the batch's JPEG bytes in one call (`torchvision.io.decode_jpeg(list,
  device=...)`: nvJPEG on CUDA), then per image applies the EXIF orientation, resizes (bilinear,
  antialiased) and center-crops on uint8 tensors with torchvision.transforms.v2.functional, takes
  the luminance for a grayscale model, and normalises the whole batch at once. When the batch call
  fails, each image is decoded alone, and one the decoder still refuses (a corrupt or truncated
  file, an encoding nvJPEG lacks) falls back to Pillow; a file Pillow cannot read either is skipped
  with Pillow's reason, never stopping the run.
* Overlap: stream.stream_images prepares batch k+1 (its bytes already read by the workers'
  prefetch; decoding and preprocessing on a second CUDA stream, Pillow tensors copied from pinned
  memory with non_blocking) before it waits for batch k's outputs, so the engine's work on batch k
  runs while batch k+1 is decoded.

The tensor path matches the Pillow path up to the two antialiased resizes' rounding: see
docs/images.md ("Decoding on the GPU") for the measured bound.
"""

from __future__ import annotations

import io
import warnings
from types import SimpleNamespace

import torch

from .images import ImageError, ResizeBound, check_declared_pixels, load_image, resolve_preprocessing

DECODE_CHOICES = ("auto", "gpu", "cpu")
# Images resized in one call at most: the antialiased resize of uint8 works in float32, 4 bytes a
# value (32 photos of 1024x768: 300 MB of temporaries, not 2.4 GB for a batch of 256).
RESIZE_CHUNK = 32
_EXIF_ORIENTATION = 0x0112
# Colour JPEGs (Pillow opens YCbCr ones as "RGB") and grayscale ones (X-rays: decoded to RGB by
# copying the gray value, as Pillow's convert("RGB") does). CMYK and YCCK go through Pillow.
_TENSOR_MODES = ("RGB", "YCbCr", "L")


def use_tensor_decoding(choice: str | None, device: torch.device) -> bool:
    """--decode: gpu -> the batched tensor path on the model's device (on a CPU device it runs in
    the main process, with torchvision's libjpeg-turbo); cpu -> Pillow in the workers; auto (or
    None) -> the tensor path on CUDA only."""
    if choice in (None, "auto"):
        return torch.device(device).type == "cuda"
    if choice not in DECODE_CHOICES:
        raise ValueError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {choice!r}")
    return choice == "gpu"


# -- in the workers: bytes, or Pillow's tensor ------------------------------------------------


def _quiet_open(data: bytes):
    """Pillow's header parse, without its decompression-bomb warning: our bound is checked next."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _orientation(img) -> int:
    """The EXIF orientation tag (1..8), 1 when absent or malformed (as load_image keeps such pixels)."""
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def jpeg_header(path: str, data: bytes) -> tuple[int, int, int] | None:
    """(upright width, upright height, orientation) of a JPEG the tensor decoder takes, from its
    header; None for anything else (the Pillow path reads it). Raises ImageError for a JPEG that
    declares more pixels than the bound."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        img = _quiet_open(data)
        if img.format not in ("JPEG", "MPO") or img.mode not in _TENSOR_MODES:  # MPO: cameras' JPEG + previews
            return None
        width, height = img.size
        orientation = _orientation(img)
    except Exception:  # a header Pillow cannot parse: its path gives the reason
        return None
    check_declared_pixels(path, width, height)
    return (height, width, orientation) if orientation >= 5 else (width, height, orientation)


class EncodedImages(torch.utils.data.Dataset):
    """(index, path) items -> (index, path, jpeg bytes or None, orientation, Pillow tensor or None,
    reason or None); never raises. The Pillow tensor is `transform(load_image(path))`."""

    def __init__(self, items, transform, preprocessing: dict):
        self.items = items
        self.transform = transform
        self.resize_size = preprocessing.get("resize_size")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        index, path = self.items[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
            header = jpeg_header(path, data)
            if header is not None:
                width, height, orientation = header
                if self.resize_size is not None:
                    ResizeBound(self.resize_size)(SimpleNamespace(size=(width, height)))
                return index, path, torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation, None, None
            return index, path, None, 1, self.transform(load_image(path)), None
        except ImageError as e:
            return index, path, None, 1, None, e.reason
        except OSError:  # missing, a folder, no permission: load_image words it as the Pillow path does
            return self._pillow(index, path)
        except Exception as e:  # the resize bound, a transform that breaks
            return index, path, None, 1, None, f"cannot preprocess ({type(e).__name__}: {e})"

    def _pillow(self, index, path):
        try:
            return index, path, None, 1, self.transform(load_image(path)), None
        except ImageError as e:
            return index, path, None, 1, None, e.reason
        except Exception as e:
            return index, path, None, 1, None, f"cannot preprocess ({type(e).__name__}: {e})"


def collate_encoded(samples):
    """A batch as three lists: jpegs [(index, path, bytes, orientation)], pillow [(index, path,
    tensor)], failed [(index, path, reason)]. Plain lists and tuples, so that pin_memory pins the
    Pillow tensors."""
    jpegs, pillow, failed = [], [], []
    for index, path, data, orientation, tensor, reason in samples:
        if data is not None:
            jpegs.append((index, path, data, orientation))
        elif tensor is not None:
            pillow.append((index, path, tensor))
        else:
            failed.append((index, path, reason))
    return jpegs, pillow, failed


# -- in the main process: decode and preprocess on the device ------------------------------------


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """[C, H, W] as stored -> upright, as PIL's ImageOps.exif_transpose turns the same pixels."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(img, 1, (-2, -1))
    return img


def decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 [3, H, W] per JPEG on device, None for one the decoder refuses. One batched call;
    when it fails (it returns nothing on any error), each image alone."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision")
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out = []
        for data in datas:
            try:
                out.append(decode_jpeg([data], mode=ImageReadMode.RGB, device=device)[0])
            except RuntimeError:
                out.append(None)
        return out


def luminance(img: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [1, H, W], L = 0.299 R + 0.587 G + 0.114 B in Pillow's fixed point
    (what build_transform's Grayscale gives via Image.convert("L")); torchvision's rgb_to_grayscale
    truncates instead of rounding, half a level darker on average."""
    r, g, b = img.to(torch.int32).unbind(-3)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(-3)


class TensorPreprocess:
    """The weights' preprocessing (images.build_transform's steps) on uint8 [3, H, W] tensors:
    resize (bilinear, antialiased; shorter side, or exactly [H, W]), center crop, luminance for a
    1-channel mean, then /255 and mean/std for a stacked batch."""

    def __init__(self, engine_or_preprocessing, device):
        pre = resolve_preprocessing(engine_or_preprocessing)
        self.resize_size = pre.get("resize_size")
        self.crop_size = pre.get("crop_size")
        self.gray = len(pre["mean"]) == 1
        self.mean, self.std = [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]
        self.device = torch.device(device)

    def image(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] upright -> uint8 [..., C, h, w] resized, cropped (and gray)."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        if self.resize_size is not None:
            size = self.resize_size if isinstance(self.resize_size, (list, tuple)) else [self.resize_size]
            img = F.resize(img, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
        if self.crop_size is not None:
            img = F.center_crop(img, self.crop_size if isinstance(self.crop_size, (list, tuple)) else [self.crop_size])
        if self.gray:
            img = luminance(img)
        return img

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 [C, h, w] of one size -> the float32 normalised batch [N, C, h, w]."""
        from torchvision.transforms.v2 import functional as F

        x = torch.stack(images).to(torch.float32).div_(255.0)
        return F.normalize(x, self.mean, self.std, inplace=True)


def preprocess_decoded(images: list[torch.Tensor], pre: TensorPreprocess) -> list[torch.Tensor]:
    """Upright uint8 [3, H, W] images -> pre.image of each, images of one size resized together
    (one set of kernel launches per size, not per image: photos from one camera share a size)."""
    by_size: dict[tuple, list[int]] = {}
    for k, img in enumerate(images):
        by_size.setdefault(tuple(img.shape), []).append(k)
    out: list = [None] * len(images)
    for same_size in by_size.values():
        for start in range(0, len(same_size), RESIZE_CHUNK):
            ks = same_size[start : start + RESIZE_CHUNK]
            stacked = torch.stack([images[k] for k in ks]) if len(ks) > 1 else images[ks[0]].unsqueeze(0)
            for k, img in zip(ks, pre.image(stacked)):
                out[k] = img
    return out


def decode_batch(jpegs, pre: TensorPreprocess, fallback) -> tuple[list, list, list]:
    """A batch's JPEGs -> (prepared [(index, path, uint8 [C, h, w] on device)], fallen back [(index,
    path, float tensor)] via fallback(path), failed [(index, path, reason)])."""
    decoded = decode_jpegs([data for _, _, data, _ in jpegs], pre.device)
    upright, fallen, failed = [], [], []
    for (index, path, _, orientation), img in zip(jpegs, decoded):
        if img is not None:
            upright.append((index, path, orient(img, orientation)))
            continue
        try:
            fallen.append((index, path, fallback(path)))
        except ImageError as e:
            failed.append((index, path, e.reason))
        except Exception as e:
            failed.append((index, path, f"cannot preprocess ({type(e).__name__}: {e})"))
    images = preprocess_decoded([img for _, _, img in upright], pre)
    return [(index, path, img) for (index, path, _), img in zip(upright, images)], fallen, failed


def group_by_shape(prepared, pre: TensorPreprocess, floats, device, non_blocking: bool) -> list:
    """Decoded uint8 images and float tensors (Pillow's) -> [(indices, paths, float batch on
    device)], one per size (without a crop, sizes differ)."""
    groups: dict[tuple, list] = {}
    for index, path, img in prepared:
        groups.setdefault(("u8",) + tuple(img.shape), []).append((index, path, img))
    for index, path, t in floats:
        groups.setdefault(("f32",) + tuple(t.shape), []).append((index, path, t))
    out = []
    for key, members in groups.items():
        tensors = [t for _, _, t in members]
        if key[0] == "u8":
            x = pre.batch(tensors)
        else:  # each tensor was pinned by the DataLoader: copy it, then stack on the device
            x = torch.stack([t.to(device, non_blocking=non_blocking) for t in tensors])
        out.append(([i for i, _, _ in members], [p for _, p, _ in members], x))
    return out


__all__ = [
    "DECODE_CHOICES",
    "EncodedImages",
    "TensorPreprocess",
    "collate_encoded",
    "decode_batch",
    "decode_jpegs",
    "group_by_shape",
    "jpeg_header",
    "luminance",
    "orient",
    "preprocess_decoded",
    "use_tensor_decoding",
]
