"""Bounds on what a file may declare, for checkpoints, weights files and images from untrusted sources.

A small file must not be able to make densetriton allocate gigabytes, loop for minutes or crash:
every reader checks what a file declares (sizes, shapes, nesting, spec fields) against these
bounds, and against what the file actually holds, before it allocates or decodes anything. The
bounds are generous for every real DenseNet: the largest registry model, densenet264 with a
100,000-class head, converts. A refusal is a `FileRefused`: one line naming the file, what it
declared and the bound; the CLI exits with status 2 and writes nothing.
"""

from __future__ import annotations

import json
import os

import numpy as np

# -- checkpoints and weights files -------------------------------------------------------------

# One tensor, and all tensors of one file (densenet264 with a 100,000-class float32 head is ~1.2 GB).
MAX_TENSOR_BYTES = 4 << 30
# Tensors one safetensors file may list (600,000 empty ones in a 34 MB header take the library 400 MB).
MAX_TENSOR_COUNT = 100_000
MAX_TOTAL_TENSOR_BYTES = 8 << 30
# A zip member (torch checkpoint, .keras archive) may inflate to at most this many times its
# compressed size, unless it is small: torch writes members uncompressed, and float weights
# hardly compress, so a high ratio is a decompression bomb, not a checkpoint.
MAX_COMPRESSION_RATIO = 20
SMALL_MEMBER_BYTES = 16 << 20
# Pickle streams: nesting of containers (a deep tuple crashes CPython's unpickler), and size.
MAX_PICKLE_DEPTH = 1000
MAX_PICKLE_BYTES = 64 << 20  # densenet264 pickled whole (torch.save(model)): 0.4 MB
# The scan and the unpickler are pure Python: a million opcodes take them a few seconds. For all
# the pickles of one file; densenet264 pickled whole (torch.save(model)) has 153,000.
MAX_PICKLE_OPS = 1_000_000
# A state dict's key (densenet264's longest is under 60 characters).
MAX_KEY_CHARS = 1024
# JSON held in a file's metadata or config (safetensors metadata, Keras config, a spec).
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64
# Values in a JSON text (its commas outside strings): 64 MB of ["ab","ab",...] is 10 million strings
# and 600 MB once parsed. 1,000,000 class names fit twice over.
MAX_JSON_ITEMS = 2_000_000

# -- spec fields ---------------------------------------------------------------------------------

MAX_BLOCKS = 16
MAX_LAYERS_PER_BLOCK = 1024
MAX_CHANNELS = 1 << 16  # growth rate, stem and block channels, bottleneck width, input channels
MAX_CLASSES = 1_000_000

# -- images --------------------------------------------------------------------------------------

# A preprocessing's resize or crop side: DenseNets are run at a few hundred pixels.
MAX_IMAGE_SIDE = 4096
# Pixels an image file may declare before it is decoded (Pillow's own bomb bound is 179 million);
# shared by predict, embed and the server. Raise it with DENSETRITON_MAX_IMAGE_PIXELS.
DEFAULT_MAX_IMAGE_PIXELS = 1 << 26  # 67 million: 8192 x 8192


def max_image_pixels() -> int:
    value = os.environ.get("DENSETRITON_MAX_IMAGE_PIXELS")
    if value is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        pixels = int(value)
    except ValueError:
        raise ValueError(f"DENSETRITON_MAX_IMAGE_PIXELS must be a whole number of pixels, got {value!r:.40}") from None
    if pixels <= 0:
        raise ValueError(f"DENSETRITON_MAX_IMAGE_PIXELS must be positive, got {pixels}")
    return pixels


class FileRefused(ValueError):
    """A file declares more than it holds, or more than a bound allows; nothing was read past the check."""


def refuse(path, what: str, declared, bound) -> FileRefused:
    """The one-line refusal: the file, what it declared, and the bound it broke."""
    return FileRefused(f"{path}: refused: {what} is {declared}, over the bound of {bound}")


class OverBound(ValueError):
    """A value over one of these bounds where no file is known yet (a spec built from a file's
    metadata): the reader that knows the file turns it into a FileRefused with `refused_in`."""

    def __init__(self, what: str, declared, bound, prefix: str = ""):
        super().__init__(f"{prefix}{what} is {declared}, over the bound of {bound}")
        self.what, self.declared, self.bound = what, declared, bound

    def refused_in(self, path, context: str = "") -> FileRefused:
        return refuse(path, f"{context}{self.what}", self.declared, self.bound)


_DEPTH_CHUNK = 1 << 22


def json_depth(text: str | bytes) -> int:
    """The deepest nesting of [ and { outside strings in a JSON text, found without parsing it
    (json.loads recurses once per level: a deep enough text raises RecursionError, or worse)."""
    return json_structure(text)[0]


def json_structure(text: str | bytes) -> tuple[int, int]:
    """(json_depth, the commas outside strings) of a JSON text, found without parsing it."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    # Escaped backslashes first, then escaped quotes: what is left of a string is its quotes.
    chars = np.frombuffer(data.replace(b"\\\\", b"").replace(b'\\"', b""), dtype=np.uint8)
    deepest = depth = quotes = commas = 0
    for start in range(0, len(chars), _DEPTH_CHUNK):  # in chunks: a few bytes of memory per byte of text
        chunk = chars[start : start + _DEPTH_CHUNK]
        outside = (quotes + np.cumsum(chunk == ord('"'))) % 2 == 0
        step = ((chunk == ord("[")) | (chunk == ord("{"))).astype(np.int64) - (
            (chunk == ord("]")) | (chunk == ord("}"))
        )
        levels = depth + np.cumsum(np.where(outside, step, 0))
        if len(levels):
            deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
            quotes += int(np.count_nonzero(chunk == ord('"')))
            commas += int(np.count_nonzero(outside & (chunk == ord(","))))
    return deepest, commas


def load_json(text: str | bytes, path, what: str):
    """json.loads of a file's JSON (metadata, a config) after bounding its size and nesting depth;
    a text over either bound is a FileRefused naming `what` in `path`."""
    if len(text) > MAX_JSON_BYTES:  # a str's characters: at most its UTF-8 bytes, counted before encoding it
        raise refuse(path, f"{what} size", f"{len(text)} characters", f"{MAX_JSON_BYTES} bytes")
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(data) > MAX_JSON_BYTES:
        raise refuse(path, f"{what} size", f"{len(data)} bytes", f"{MAX_JSON_BYTES} bytes")
    depth, commas = json_structure(data)
    if depth > MAX_JSON_DEPTH:
        raise refuse(path, f"{what} nesting depth", depth, MAX_JSON_DEPTH)
    if commas + 1 > MAX_JSON_ITEMS:
        raise refuse(path, f"the number of values in {what}", f"{commas + 1} or more", MAX_JSON_ITEMS)
    return json.loads(text)
