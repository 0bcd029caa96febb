"""Images in, batch tensors out; logits in, labelled top-k out.

    img = load_image("photo.jpg")                 # any PIL-readable file -> RGB, upright
    x = preprocess([img, "other.png"], engine)     # [N, C, crop, crop] on engine.device
    topk(engine(x), 5, engine.class_names)         # [[("tabby", 0.83), ...], ...]

Reading is robust to what real files contain:

* EXIF orientation is applied (ImageOps.exif_transpose), so photos come out upright.
* Grayscale ("L", "1"), CMYK, YCbCr, LAB and HSV files are converted with PIL (no colour
  management: an embedded ICC profile is not applied).
* Transparency (RGBA, LA, premultiplied RGBa, palette images with a transparent colour, PA) is
  composited onto white, the way a viewer shows the image on a white page. Dropping the alpha
  channel instead would expose whatever colour the fully transparent pixels happen to store
  (often black, sometimes garbage).
* 16-bit images (modes "I;16*", and "I" as older Pillow opens 16-bit PNGs) are scaled from the
  full 16-bit range to 8 bits, round(v / 257), so 65535 -> 255; PIL's own conversion would clip
  everything above 255 to white. Values of mode "I" outside 0..65535 and 32-bit float images
  ("F") outside 0..1 are stretched linearly from their minimum to their maximum; float images
  within 0..1 are scaled by 255.
* Multi-frame files (GIF, TIFF, DICOM) give their first frame.
* DICOM files (by suffix, or by the "DICM" marker: see is_image_path; needs pydicom) are
  read as a radiologist's viewer shows them: the modality LUT (rescale slope and intercept),
  then the file's first VOI LUT (scaled by its largest entry) or window (center/width, with its
  LINEAR, LINEAR_EXACT or SIGMOID function) mapped onto 0..255, or without a valid one the
  image's own minimum to maximum (padding pixels left out); MONOCHROME1 is inverted so that
  higher values are brighter; padding (PixelPaddingValue) is black. Colour and palette DICOM
  come out as RGB. Only the first frame of a multi-frame file is decoded; enhanced multi-frame
  files (per-frame rescale and window) are refused.
* A grayscale model (one input channel) gets the image's luminance, as torchvision's Grayscale
  computes it from the RGB image (L = 0.299 R + 0.587 G + 0.114 B; a gray image is unchanged).

* An image that declares more pixels than limits.max_image_pixels() (DENSETRITON_MAX_IMAGE_PIXELS;
  8192 x 8192 by default) is refused from its header, before anything is decoded: a PNG of a
  hundred bytes can declare billions. For DICOM the bound is per frame (Rows x Columns), and
  uncompressed pixel data must be as long as the header declares. A resize whose output would be
  over the bound (a 1 x 60000 strip resized to a shorter side of 256) is refused too.

A file that cannot be read raises ImageError, whose `reason` says why in a few words.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch

from .limits import max_image_pixels
from .weights import IMAGENET_PREPROCESSING

# Folder scans pick files by suffix (case-insensitive), and DICOM files named without one by their
# marker (is_image_path); a file named explicitly is always tried.
IMAGE_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".bmp",
        ".dib",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".ico",
        ".dcm",
        ".dicom",
    }
)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

# Used when neither the weights file nor the spec defines preprocessing (CIFAR-stem models):
# the image is used at its own size, only scaled to 0..1 and normalised with ImageNet's mean/std.
NO_RESIZE_PREPROCESSING = {
    "resize_size": None,
    "crop_size": None,
    "mean": IMAGENET_PREPROCESSING["mean"],
    "std": IMAGENET_PREPROCESSING["std"],
}

_WHITE = (255, 255, 255)
_PILLOW_BOUND_LOCK = threading.Lock()


class ImageError(ValueError):
    """A file that could not be read as an image; `reason` says why in a few words."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether a folder scan picks this file up: by its suffix, or, for the names PACS exports and
    DICOMDIR trees give DICOM files (no suffix, as IM0001, or a UID's digits, as 1.2.840.113619.2.55),
    by the DICOM marker. Other files are never opened."""
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if os.path.basename(str(path)).upper() == "DICOMDIR":
        return False  # a DICOMDIR tree's index, not an image
    # Only regular files (isfile) are opened: reading a named pipe would wait for a writer forever.
    # No suffix, a bare trailing dot (IM0004.), or a UID's last digits.
    return (suffix in ("", ".") or suffix[1:].isdigit()) and os.path.isfile(path) and _is_dicom(path)


# -- reading --------------------------------------------------------------------------------


def _composite_on_white(img):
    from PIL import Image

    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale one channel of 16-bit, 32-bit integer or float pixels to uint8."""
    values = values.astype(np.float64)
    if values.size == 0:
        return values.astype(np.uint8)
    lo, hi = float(values.min()), float(values.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = values / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    elif hi > lo:
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(img):
    """A PIL image of any mode as an 8-bit RGB PIL image (see the module docstring for the rules).

    Orientation is left alone: load_image applies EXIF orientation before calling this.
    """
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("RGBA", "LA", "RGBa", "PA"):
        return _composite_on_white(img)
    if mode == "P":
        if "transparency" in img.info:
            return _composite_on_white(img)
        return img.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _to_uint8(np.asarray(img), mode)
        return Image.fromarray(gray).convert("RGB")  # uint8 [H, W] -> "L"
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


def _is_dicom(path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then "DICM"."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _dicom_window(values: np.ndarray, ds) -> np.ndarray | None:
    """The file's first window onto 0..255 by pydicom's windowing (LINEAR, LINEAR_EXACT, SIGMOID),
    or None when it has none or an invalid one (a viewer then shows the full range)."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    # pydicom maps a window onto the range of the stored values: a dataset that holds only the
    # window and says 8 unsigned stored bits, no rescale, makes that range 0..255.
    view = Dataset()
    view.PhotometricInterpretation = "MONOCHROME2"
    view.WindowCenter, view.WindowWidth = ds.WindowCenter, ds.WindowWidth
    if "VOILUTFunction" in ds:
        view.VOILUTFunction = ds.VOILUTFunction
    view.BitsStored, view.PixelRepresentation = 8, 0
    try:
        return apply_windowing(values.astype(np.float64), view)
    except (ValueError, TypeError):  # a zero width, an unknown function (LOG)
        return None


def _dicom_to_8bit(ds) -> np.ndarray:
    """Pixels of a DICOM dataset as a viewer shows them, uint8 [H, W] or [H, W, 3]."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    if "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        raise ValueError(
            "an enhanced multi-frame file (rescale and window per frame): export the image as a "
            "single-frame DICOM first"
        )
    # Only the first frame is decoded: a multi-frame file may hold hundreds.
    pixels = pixel_array(ds, index=0) if int(ds.get("NumberOfFrames", 1) or 1) > 1 else ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if not photometric.startswith("MONOCHROME"):  # colour (YBR decoded as RGB) at its stored depth
        if pixels.dtype == np.uint8:
            return pixels
        top = 2 ** int(ds.get("BitsStored", 8 * pixels.itemsize)) - 1 if photometric != "PALETTE COLOR" else 65535
        return np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8)
    padding = ds.get("PixelPaddingValue")
    body = np.ones(pixels.shape, dtype=bool) if padding is None else pixels != padding  # padding: outside the body
    values = apply_modality_lut(pixels, ds)
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
        lut = (
            np.frombuffer(item.LUTData, dtype=np.uint16)
            if isinstance(item.LUTData, bytes)
            else np.asarray(item.LUTData)
        )
        lut = lut[:entries].astype(np.float64)
        # The lookup is done here (pydicom indexes with the LUT's own dtype, which wraps for an
        # 8-bit LUT of more than 256 entries), and scaled by the largest entry, as viewers do:
        # LUTs declared 16-bit often span 0..4095.
        gray = lut[np.clip(np.floor(values) - first, 0, len(lut) - 1).astype(np.int64)] * (255.0 / max(lut.max(), 1.0))
    else:
        gray = _dicom_window(values, ds)
    if gray is None:
        values = values.astype(np.float64)
        inside = values[body] if body.any() else values
        lo, hi = float(inside.min()), float(inside.max())
        gray = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    gray[~body] = 0  # padding shows black, inverted or not
    return gray


def _load_dicom(path):
    from PIL import Image

    try:
        import pydicom
    except ImportError:
        raise ImageError(path, "a DICOM file: reading it needs pydicom (pip install pydicom)") from None
    try:
        # force: some exporters write the dataset without the 128-byte preamble and "DICM".
        ds = pydicom.dcmread(path, force=True)
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory") from None
    except Exception as e:  # InvalidDicomError, struct errors of truncated files
        raise ImageError(path, _one_line(f"not a readable DICOM file ({type(e).__name__}: {e})")) from None
    if "PixelData" not in ds:
        if "SOPClassUID" in ds:
            raise ImageError(path, "a DICOM file without pixel data")
        if _is_dicom(path):
            raise ImageError(path, "corrupt or truncated DICOM file (no readable data elements)")
        raise ImageError(path, "not a DICOM file (no DICM marker, no readable data elements)")
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is None or "TransferSyntaxUID" not in file_meta:
        from pydicom.uid import ImplicitVRLittleEndian

        ds.file_meta = file_meta if file_meta is not None else pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # what a file without a header is written in
    _check_dicom_declared(path, ds)
    try:
        pixels = _dicom_to_8bit(ds)
    except Exception as e:  # compressed pixel data without a decoder plugin, inconsistent attributes
        name = getattr(ds.file_meta.TransferSyntaxUID, "name", ds.file_meta.TransferSyntaxUID)
        raise ImageError(
            path, _one_line(f"DICOM pixel data ({name}) could not be read ({type(e).__name__}: {e})")
        ) from None
    return Image.fromarray(pixels).convert("RGB")


def _check_dicom_declared(path, ds) -> None:
    """What a DICOM header declares, checked before its pixel data is decoded: a frame's pixels
    (Rows x Columns; only the first frame is decoded) within max_image_pixels(), 1 or 3 samples a
    pixel, and uncompressed pixel data as long as declared (every frame: the file must hold them).
    A compressed frame's decoder allocates the declared size before it finds the data short."""
    from pydicom.pixels.utils import get_expected_length

    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except Exception as e:  # missing or non-numeric attributes
        raise ImageError(path, _one_line(f"a DICOM image without a readable size ({type(e).__name__}: {e})")) from None
    check_declared_pixels(path, columns, rows)
    if samples not in (1, 3):
        raise ImageError(path, f"refused: it declares {samples} samples per pixel (DICOM images have 1 or 3)")
    try:
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            return
        expected = get_expected_length(ds, unit="bytes")
    except Exception as e:  # an unknown transfer syntax, attributes of the wrong type
        raise ImageError(
            path, _one_line(f"a DICOM image with unreadable attributes ({type(e).__name__}: {e})")
        ) from None
    held = len(ds.PixelData) if "PixelData" in ds and ds.PixelData is not None else 0
    if held < expected:
        raise ImageError(path, f"refused: it declares {expected:,} bytes of pixel data and holds {held:,}")


def check_declared_pixels(path, width: int, height: int) -> None:
    """An image that declares more than max_image_pixels() pixels is refused before it is decoded:
    a few hundred bytes of PNG or DICOM can declare gigabytes."""
    bound = max_image_pixels()
    if width * height > bound:
        raise ImageError(
            path,
            f"refused: it declares {width}x{height} = {width * height:,} pixels, over the bound of "
            f"{bound:,} (DENSETRITON_MAX_IMAGE_PIXELS)",
        )


def _open_header(path):
    """Image.open, which reads only the header, with Pillow's own pixel bound off: ours, checked right
    after, replaces it, so that DENSETRITON_MAX_IMAGE_PIXELS alone decides (above Pillow's 179 million
    too) and an image over it is one refusal, not a DecompressionBombWarning first. The lock keeps
    concurrent loads from restoring each other's setting."""
    from PIL import Image

    with _PILLOW_BOUND_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _one_line(text: str) -> str:
    return " ".join(text.split())


def load_image(path: str | os.PathLike):
    """Read an image file as an upright 8-bit RGB PIL image; raises ImageError if it cannot."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if os.path.splitext(str(path))[1].lower() in DICOM_SUFFIXES or _is_dicom(path):
        return _load_dicom(path)
    try:
        with _open_header(path) as img:
            check_declared_pixels(path, *img.size)
            img.load()
            try:
                upright = ImageOps.exif_transpose(img)
            except Exception:  # malformed EXIF: keep the pixels as stored rather than lose the image
                upright = img
            if upright is None:  # exif_transpose(in_place=...) semantics in some versions
                upright = img
            return to_rgb(upright)
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (PIL cannot identify the file)") from None
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # a later frame or tile over Pillow's bound (GIF, ICO, TIFF)
        raise ImageError(path, _one_line(f"refused: {e}")) from None
    except OSError as e:
        raise ImageError(path, f"corrupt or truncated image ({e})") from None
    except Exception as e:  # SyntaxError, ValueError, struct.error ... from format plugins
        raise ImageError(path, f"unreadable image ({type(e).__name__}: {e})") from None


# -- preprocessing --------------------------------------------------------------------------


def resolve_preprocessing(engine_or_preprocessing=None) -> dict:
    """The preprocessing dict of an engine, a dict (missing keys filled), or None.

    None, or an RGB engine without preprocessing (CIFAR-stem specs whose file defines none), gives
    NO_RESIZE_PREPROCESSING: images at their own size, normalised with ImageNet's mean and std.
    An engine for other than 3 input channels has no such default: how its images were scaled in
    training is not guessable, so its weights file must say (densetriton convert --mean --std).
    """
    if engine_or_preprocessing is None:
        pre = None
    elif isinstance(engine_or_preprocessing, dict):
        pre = engine_or_preprocessing
    elif hasattr(engine_or_preprocessing, "preprocessing"):
        pre = engine_or_preprocessing.preprocessing
    else:
        raise TypeError(
            f"expected an Engine, a preprocessing dict or None, got {type(engine_or_preprocessing).__name__}"
        )
    if pre is None:
        spec = getattr(engine_or_preprocessing, "spec", None)
        channels = 3 if spec is None else spec.in_channels
        if channels not in (1, 3):
            raise ValueError(
                f"this model takes {channels}-channel images, and image files give 1 (grayscale) or 3 (RGB): "
                f"call the engine on [N, {channels}, H, W] tensors instead"
            )
        if channels == 1:
            raise ValueError(
                "this grayscale model's weights file records no preprocessing (how its images were prepared in "
                "training): record it with densetriton convert --checkpoint FILE --out NEW_FILE --mean M --std S "
                "[--resize-size N --crop-size N]; the file's class names carry over"
            )
        return dict(NO_RESIZE_PREPROCESSING)
    out = dict(NO_RESIZE_PREPROCESSING)
    out.update({k: pre[k] for k in ("resize_size", "crop_size", "mean", "std") if k in pre})
    return out


class ResizeBound:
    """A transform that refuses a PIL image whose resize (as torchvision's Resize computes it) would
    exceed max_image_pixels(): a 1 x 60000 strip resized to a shorter side of 256 is 15 million
    pixels long, billions in all, though the file itself is within the bound."""

    def __init__(self, resize_size):
        self.resize_size = resize_size

    def __call__(self, img):
        width, height = img.size
        size = self.resize_size
        if isinstance(size, (list, tuple)) and len(size) == 2:
            out_h, out_w = size
        else:
            side = size[0] if isinstance(size, (list, tuple)) else size
            short, long = min(width, height), max(width, height)
            out_short, out_long = side, int(side * long / max(short, 1))
            out_w, out_h = (out_short, out_long) if width <= height else (out_long, out_short)
        bound = max_image_pixels()
        if out_w * out_h > bound:
            raise ValueError(
                f"refused: resizing its {width}x{height} pixels to resize_size {size} gives {out_w}x{out_h} "
                f"= {out_w * out_h:,} pixels, over the bound of {bound:,} (DENSETRITON_MAX_IMAGE_PIXELS)"
            )
        return img


def build_transform(engine_or_preprocessing=None):
    """torchvision transforms for a preprocessing dict: Resize (bilinear, antialiased; the shorter
    side to resize_size, or exactly [H, W] for a pair), CenterCrop(crop_size), Grayscale for a 1-channel mean and std, ToTensor,
    Normalize(mean, std). Resize and crop are left out when their size is None."""
    from torchvision import transforms

    from .weights import check_preprocessing

    pre = resolve_preprocessing(engine_or_preprocessing)
    channels = len(pre["mean"]) if isinstance(pre["mean"], (list, tuple)) else None
    if channels not in (1, 3):
        raise ValueError(
            f"image files give 1 (grayscale) or 3 (RGB) channels; this preprocessing's mean is {pre['mean']!r:.60}"
        )
    check_preprocessing(pre, channels)
    max_image_pixels()  # a malformed DENSETRITON_MAX_IMAGE_PIXELS is one error here, not one per image
    steps = []
    if pre.get("resize_size") is not None:
        steps.append(ResizeBound(pre["resize_size"]))
        steps.append(
            transforms.Resize(pre["resize_size"], interpolation=transforms.InterpolationMode.BILINEAR, antialias=True)
        )
    if pre.get("crop_size") is not None:
        steps.append(transforms.CenterCrop(pre["crop_size"]))
    if channels == 1:
        steps.append(transforms.Grayscale(num_output_channels=1))
    steps.append(transforms.ToTensor())
    steps.append(transforms.Normalize(mean=list(pre["mean"]), std=list(pre["std"])))
    return transforms.Compose(steps)


def describe_preprocessing(engine_or_preprocessing=None) -> str:
    pre = resolve_preprocessing(engine_or_preprocessing)
    parts = []
    size = pre.get("resize_size")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        parts.append(f"resize to {size[0]}x{size[1]}")
    elif size is not None:
        parts.append(f"resize {size if isinstance(size, int) else size[0]}")
    if pre.get("crop_size") is not None:
        parts.append(f"center crop {pre['crop_size']}")
    if not parts:
        parts.append("no resize or crop")
    if len(pre["mean"]) == 1:
        parts.append("grayscale")
    fmt = lambda v: "[" + ", ".join(f"{x:g}" for x in v) + "]"  # noqa: E731
    parts.append(f"mean {fmt(pre['mean'])}, std {fmt(pre['std'])}")
    return ", ".join(parts)


def preprocess(images_or_paths, engine_or_preprocessing=None) -> torch.Tensor:
    """Paths and/or PIL images (one or a list) -> the float32 batch [N, C, H, W] an engine takes.

    Paths are read with load_image (EXIF orientation, any mode -> RGB); PIL images are converted
    to RGB with to_rgb (their orientation is left as it is); a 1-channel preprocessing then takes
    their luminance. With an engine the batch is put on
    engine.device and its preprocessing is used; with a dict (or None: see resolve_preprocessing)
    the batch stays on the CPU.
    """
    from PIL import Image

    if isinstance(images_or_paths, (str, os.PathLike, Image.Image)):
        images_or_paths = [images_or_paths]
    transform = build_transform(engine_or_preprocessing)
    tensors = []
    for item in images_or_paths:
        img = to_rgb(item) if isinstance(item, Image.Image) else load_image(item)
        tensors.append(transform(img))
    if not tensors:
        raise ValueError("no images given")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(
            f"the images have different sizes after preprocessing ({', '.join(str(s[1]) + 'x' + str(s[2]) for s in sorted(shapes))}) "
            f"and cannot form one batch: use a preprocessing with a crop_size, or preprocess them one at a time"
        )
    batch = torch.stack(tensors)
    device = getattr(engine_or_preprocessing, "device", None)
    return batch.to(device) if device is not None else batch


# -- results --------------------------------------------------------------------------------


def probabilities(
    logits: torch.Tensor, multi_label: bool = False, operating_points: Sequence[float | None] | None = None
) -> torch.Tensor:
    """Softmax over classes, or with multi_label an independent sigmoid per class (float32, CPU).

    operating_points (multi-label only; one per class, or None): each class's sigmoid is mapped
    piecewise-linearly so that its operating point t lands on 0.5 -- p / 2t below t, 1 - (1 - p) /
    2(1 - t) above -- as torchxrayvision reports its findings; a class without one (None) reads 0.5,
    as torchxrayvision's untrained outputs do."""
    logits = logits.detach().float().cpu()
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [N, classes], got {tuple(logits.shape)}")
    if not multi_label:
        return torch.softmax(logits, dim=1)
    p = torch.sigmoid(logits)
    if operating_points is None:
        return p
    if len(operating_points) != p.shape[1]:
        raise ValueError(f"{len(operating_points)} operating points for {p.shape[1]} classes")
    t = torch.tensor([math.nan if v is None else v for v in operating_points], dtype=torch.float32)
    calibrated = torch.where(p < t, p / (2 * t), 1 - (1 - p) / (2 * (1 - t)))
    return torch.where(t.isnan(), torch.full_like(p, 0.5), calibrated)


def topk(
    logits: torch.Tensor,
    k: int = 5,
    class_names: Sequence[str] | None = None,
    multi_label: bool = False,
    operating_points: Sequence[float | None] | None = None,
) -> list[list[tuple[str, float]]]:
    """Per image, the k most probable classes as [(name, probability), ...], most probable first.

    Probabilities are a softmax over the classes, or with multi_label a sigmoid per class (as
    multi-label models such as chest X-ray classifiers need), calibrated to operating_points when
    given (see probabilities). Names come from class_names, else
    are the class indices as strings; k is capped at the number of classes. A single image's
    logits [classes] count as a batch of one.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    probs = probabilities(logits, multi_label, operating_points)
    num_classes = probs.shape[1]
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    values, indices = probs.topk(min(k, num_classes), dim=1)
    names = class_names if class_names is not None else [str(i) for i in range(num_classes)]
    return [
        [(names[i], p) for i, p in zip(row_indices, row_values)]
        for row_indices, row_values in zip(indices.tolist(), values.tolist())
    ]


def format_prob(p: float) -> str:
    """The shortest decimal that reads back as the same float32 value."""
    return str(np.float32(p))


__all__ = [
    "IMAGE_SUFFIXES",
    "ImageError",
    "build_transform",
    "describe_preprocessing",
    "is_image_path",
    "load_image",
    "preprocess",
    "probabilities",
    "resolve_preprocessing",
    "to_rgb",
    "topk",
]
