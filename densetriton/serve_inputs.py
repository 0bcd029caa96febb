"""What one request to `densetriton serve` carries, read before it joins a batch.

A request holds one image or several: the raw body (Content-Type image/*, application/octet-stream
or application/dicom), multipart form fields named `file`, or JSON {"image": "<base64>"} or
{"images": ["<base64>", ...]}; and for /predict a `topk` (query parameter, form or JSON field).
Each image is read with load_image and preprocessed with build_transform's own transforms -- the
code `densetriton predict` uses -- in the HTTP process, before the request is queued: a request that
cannot be read is answered with its 4xx there and never reaches the inference worker, so it cannot
fail the batch it would have joined (LitServe answers a whole batch with the error when one request
of it raises). The image steps (resize, crop, grayscale) run there and the result travels as 8-bit
pixels, a quarter of float32's bytes through LitServe's queue; ToTensor's scaling and Normalize run
on the worker's device, on the whole batch (to_model_input: the same arithmetic, so the same floats).

Every refusal is an HTTPException whose detail is one line:
  400  not an image, a corrupt one, malformed JSON, base64 or topk, an empty body
  413  a body over --max-body-mb, more images than MAX_IMAGES_PER_REQUEST, an image declaring
       more pixels than densetriton.limits.max_image_pixels() (checked before decoding)
  415  a Content-Type other than the above
"""

import base64
import binascii
import json
import tempfile

import numpy as np
import torch
from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .images import ImageError, build_transform, load_image
from .limits import FileRefused

RAW_TYPES = ("application/octet-stream", "application/dicom")
MAX_IMAGES_PER_REQUEST = 256  # the worker splits a request's images into warmed batches
DEFAULT_TOPK = 5
ACCEPTED = (
    "send one image as the body (Content-Type image/* or application/octet-stream), multipart/form-data "
    'with a field named file, or JSON {"image": "<base64>"} or {"images": [...]}'
)


def refused(status: int, reason: str) -> HTTPException:
    return HTTPException(status_code=status, detail=" ".join(str(reason).split()))


class RequestReader:
    """Reads requests for one server: the weights' preprocessing and the body limit. Lives in
    app.state, so every HTTP process (LitServe forks them from the main one) has its own copy."""

    def __init__(self, preprocessing: dict, max_body_bytes: int, input_shape: tuple):
        self.preprocessing = preprocessing
        self.max_body_bytes = max_body_bytes
        self.input_shape = tuple(input_shape)  # [C, H, W] every image must come out as
        # Built here, in the main process, so that the HTTP processes forked from it start with
        # torchvision imported rather than importing it on their first request.
        self.image_steps = image_steps(preprocessing)

    async def read(self, request: Request, *, with_topk: bool) -> dict:
        """{"images": uint8 [N, H, W, C], "single": one image sent, "topk": K or None}."""
        self.check_declared_length(request)
        blobs, fields, single = await self.read_blobs(request)
        topk = choose_topk(request, fields) if with_topk else None
        images = await run_in_threadpool(self.preprocess_all, blobs)
        return {"images": images, "single": single, "topk": topk}

    def check_declared_length(self, request: Request) -> None:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self.too_large(int(declared))

    def too_large(self, size: int) -> HTTPException:
        limit = self.max_body_bytes / 2**20
        return refused(
            413, f"the body is {size / 2**20:.1f} MiB, over this server's limit of {limit:g} MiB (--max-body-mb)"
        )

    async def read_blobs(self, request: Request) -> tuple[list[bytes], dict, bool]:
        """The request's image bytes, its other fields, and whether it sent exactly one image."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "application/json":
            return parse_json(await self.body(request))
        if media == "multipart/form-data":
            return await parse_form(request)
        if media.startswith("image/") or media in RAW_TYPES:
            body = await self.body(request)
            if not body:
                raise refused(400, "the body is empty: " + ACCEPTED)
            return [body], {}, True
        shown = media or "none"
        raise refused(415, f"unsupported Content-Type {shown!r:.60}: {ACCEPTED}")

    async def body(self, request: Request) -> bytes:
        body = await request.body()  # LitServe's MaxSizeMiddleware stops a chunked body at the limit
        if len(body) > self.max_body_bytes:
            raise self.too_large(len(body))
        return body

    def preprocess_all(self, blobs: list[bytes]) -> np.ndarray:
        many = len(blobs) > 1
        arrays = [self.preprocess(blob, f"image {i}: " if many else "") for i, blob in enumerate(blobs)]
        return np.stack(arrays)

    def preprocess(self, blob: bytes, where: str) -> np.ndarray:
        """One image's bytes -> its uint8 [H, W, C] pixels after resize and crop, as `densetriton
        predict` makes them before ToTensor."""
        # load_image reads files: the image is staged in the temporary folder (TMPDIR) while it is read.
        with tempfile.NamedTemporaryFile(prefix="densetriton-serve-") as f:
            try:
                f.write(blob)
                f.flush()
            except OSError as e:  # the temporary folder is full: the server's trouble, not the request's
                raise refused(503, f"the server cannot stage the image ({e.strerror or e}); try again later") from None
            try:
                image = load_image(f.name)
            except FileRefused as e:  # declared more than a bound, before decoding
                raise refused(413, where + str(e).replace(f.name, "the image")) from None
            except ImageError as e:
                raise refused(413 if declares_too_many_pixels(e.reason) else 400, where + e.reason) from None
        pixels = np.array(self.image_steps(image), dtype=np.uint8)
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels  # grayscale: one channel
        channels, height, width = self.input_shape
        if pixels.shape != (height, width, channels):  # the preprocessing fixes it; a guard, not a path
            raise refused(400, f"{where}preprocessed to {pixels.shape[:2]}, not {(height, width)}")
        return pixels


def image_steps(preprocessing: dict):
    """build_transform's steps up to its ToTensor and Normalize, which to_model_input does on a batch."""
    from torchvision import transforms

    steps = build_transform(preprocessing).transforms
    if not (isinstance(steps[-2], transforms.ToTensor) and isinstance(steps[-1], transforms.Normalize)):
        raise ValueError("build_transform no longer ends with ToTensor and Normalize, which to_model_input replaces")
    return transforms.Compose(steps[:-2])


def to_model_input(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [N, H, W, C] -> the float32 [N, C, H, W] an engine takes: ToTensor's division by 255 and
    Normalize's subtraction and division, on the tensor's device (each is rounded once, so a batch
    on any device gives the floats build_transform gives one image at a time)."""
    from torchvision.transforms.functional import normalize

    x = pixels.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    return normalize(x, list(mean), list(std))


def declares_too_many_pixels(reason: str) -> bool:
    """load_image's refusal of a decompression bomb (its pixel bound, or Pillow's), as opposed to a
    file that is not an image or is corrupt."""
    return reason.startswith("too large") or (reason.startswith("refused") and "pixels, over the bound" in reason)


def parse_json(body: bytes) -> tuple[list[bytes], dict, bool]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise refused(400, "the body is not valid JSON: " + ACCEPTED) from None
    if not isinstance(document, dict) or ("image" in document) == ("images" in document):
        raise refused(400, 'JSON must be an object with either "image" (one base64 image) or "images" (a list)')
    if "image" in document:
        return [decode_base64(document["image"], "image")], document, True
    listed = document["images"]
    if not isinstance(listed, list) or not listed:
        raise refused(400, '"images" must be a non-empty list of base64 strings')
    check_count(len(listed))
    return [decode_base64(item, f"images[{i}]") for i, item in enumerate(listed)], document, False


async def parse_form(request: Request) -> tuple[list[bytes], dict, bool]:
    try:
        form = await request.form(max_files=MAX_IMAGES_PER_REQUEST)
    except StarletteHTTPException as e:  # starlette's 400 for a malformed form or too many files; a 413 passes
        if e.status_code != 400:
            raise
        if "too many files" in str(e.detail).lower():
            check_count(MAX_IMAGES_PER_REQUEST + 1)
        raise refused(400, f"malformed multipart/form-data: {e.detail}") from None
    files = form.getlist("file")
    if not files:
        raise refused(400, "multipart/form-data without a field named file: " + ACCEPTED)
    check_count(len(files))
    blobs = []
    for item in files:
        blob = await item.read() if hasattr(item, "read") else str(item).encode()
        if not blob:
            raise refused(400, "a file field is empty")
        blobs.append(blob)
    fields = {k: v for k, v in form.items() if k != "file"}
    return blobs, fields, len(blobs) == 1


def check_count(count: int) -> None:
    if count > MAX_IMAGES_PER_REQUEST:
        raise refused(
            413,
            f"more than {MAX_IMAGES_PER_REQUEST} images in one request"
            if count == MAX_IMAGES_PER_REQUEST + 1
            else f"{count} images in one request, over the limit of {MAX_IMAGES_PER_REQUEST}",
        )


def decode_base64(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise refused(400, f'"{where}" must be a base64 string')
    if value.startswith("data:") and "," in value:  # a data URL: data:image/png;base64,....
        value = value.split(",", 1)[1]
    try:
        blob = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise refused(400, f'"{where}" is not valid base64') from None
    if not blob:
        raise refused(400, f'"{where}" is empty')
    return blob


def choose_topk(request: Request, fields: dict) -> int:
    """topk from the form or JSON fields, else the query string, else DEFAULT_TOPK."""
    value = fields.get("topk", request.query_params.get("topk"))
    if value is None:
        return DEFAULT_TOPK
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise refused(400, f"topk must be a whole number >= 1, got {str(value)!r:.40}")
    return value


async def read_predict_request(request: Request) -> dict:
    """The FastAPI dependency of /predict (LitServe passes its result to decode_request)."""
    return await request.app.state.densetriton_reader.read(request, with_topk=True)


async def read_embed_request(request: Request) -> dict:
    """The FastAPI dependency of /embed."""
    return await request.app.state.densetriton_reader.read(request, with_topk=False)
