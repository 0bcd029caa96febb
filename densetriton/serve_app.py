"""The LitServe application behind `densetriton serve`: the model card, the /predict and /embed
LitAPIs (a worker's model, warmed at every batch size; gathered requests padded to a warmed size),
and the LitServer with one-line JSON errors. The command line and shutdown are in serve.py.
"""

import argparse
import secrets
import signal
from typing import Annotated

import litserve as ls
import numpy as np
import torch
from fastapi import Depends, Header, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .images import describe_preprocessing, format_prob, probabilities, resolve_preprocessing
from .serve_inputs import RequestReader, read_embed_request, read_predict_request, to_model_input

# -- what the server answers with ----------------------------------------------------------


def model_card(args) -> dict:
    """What every process needs to know about the model, worked out once in the main process from an
    engine on the CPU: preprocessing, classes, how probabilities are made, the model ids that
    `densetriton predict` and `densetriton embed` write. Also the body of GET /info."""
    from .stream import Dist, load_engine, model_id

    cpu = argparse.Namespace(**{**vars(args), "device": "cpu", "backend": "reference", "dtype": "float32"})
    engine = load_engine(cpu, Dist())
    pre = resolve_preprocessing(engine)
    size = fixed_input_size(pre)
    multi_label = engine.multi_label if args.multi_label is None else args.multi_label
    classes = engine.spec.num_classes
    cuda = torch.cuda.is_available() and args.devices != 0
    return {
        "model": args.weights or args.model,
        "model_id": model_id(engine, head=True, multi_label=multi_label) if classes else None,
        "embed_model_id": model_id(engine, head=False),
        "classes": classes,
        "class_names": engine.class_names,
        "features": engine.spec.num_features,
        "multi_label": bool(multi_label),
        "operating_points": engine.operating_points if multi_label else None,
        "preprocessing": pre,
        "preprocessing_text": describe_preprocessing(pre),
        "input_shape": [engine.spec.in_channels, *size],
        "dtype": args.dtype or ("float16" if cuda else "float32"),
        "backend": args.backend if args.backend != "auto" else ("triton" if cuda else "reference"),
        "batch_sizes": list(args.batch_sizes),
    }


def fixed_input_size(pre: dict) -> tuple[int, int]:
    """The [H, W] every preprocessed image has: batches and warmed plans need one size."""
    crop, resize = pre.get("crop_size"), pre.get("resize_size")
    if crop is not None:
        return (crop, crop) if isinstance(crop, int) else tuple(crop)
    if isinstance(resize, (list, tuple)) and len(resize) == 2:
        return tuple(resize)
    raise ValueError(
        "serving needs images of one size, and this model's preprocessing does not fix one (no crop, "
        "no exact resize): record one with densetriton convert --checkpoint FILE --out NEW_FILE "
        "--mean M --std S --resize-size H W (or --crop-size N)"
    )


def topk_rows(logits: torch.Tensor, k: int, card: dict) -> list[list[dict]]:
    """Per image its k most probable classes, as `densetriton predict` ranks them (images.topk's
    probabilities and order), with each class's index as well as its name."""
    probs = probabilities(logits, card["multi_label"], card["operating_points"])
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    names = card["class_names"]
    return [
        [
            {"label": names[i] if names else str(i), "index": i, "prob": float(format_prob(p))}
            for i, p in zip(row_i, row_p)
        ]
        for row_i, row_p in zip(indices.tolist(), values.tolist())
    ]


# -- the inference workers -----------------------------------------------------------------


def densetriton_runner(args, device: str):
    """The model a worker runs: a densetriton engine on the worker's device."""
    from .stream import Dist, load_engine

    return load_engine(argparse.Namespace(**{**vars(args), "device": device}), Dist())


class ImageAPI(ls.LitAPI):
    """What /predict and /embed share: the worker's model, warmed at every batch size, and the
    padded batches. `runner(args, device)` builds the model: an object with __call__ (logits),
    features and warmup(batch_sizes), as an Engine has."""

    def __init__(self, args, card: dict, api_key: str | None, runner=densetriton_runner, **kwargs):
        super().__init__(max_batch_size=max(args.batch_sizes), batch_timeout=args.batch_timeout_ms / 1000, **kwargs)
        self.args, self.card, self.api_key, self.runner = args, card, api_key, runner
        self.sizes = sorted(args.batch_sizes)

    def setup(self, device):
        # Ctrl-C and `systemctl stop` signal every process of the group: the main process stops the
        # workers (SIGUSR1) once the requests already received are answered (serve.Drain).
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        torch.set_num_threads(max(1, torch.get_num_threads() // max(1, self.args.workers_per_device)))
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        self.model = self.runner(self.args, device)
        self.target = torch.device(device)
        self.model.warmup(self.sizes)

    def authorize(self, x_api_key: str | None = Header(None), authorization: str | None = Header(None)):
        """With --api-key-env: the key as `X-API-Key: KEY` or `Authorization: Bearer KEY`, else 401."""
        if self.api_key is None:
            return
        bearer = authorization[7:].strip() if authorization and authorization[:7].lower() == "bearer " else None
        given = x_api_key if x_api_key is not None else bearer
        if given is None or not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise HTTPException(
                status_code=401, detail="a valid API key is needed: send X-API-Key: KEY or Authorization: Bearer KEY"
            )

    def batch(self, inputs):
        return inputs  # the requests, each with its images; predict runs them together

    def unbatch(self, output):
        return output

    def predict(self, requests):
        images = torch.from_numpy(np.concatenate([r["images"] for r in requests]))
        rows = self.per_image(self.run_padded(images), requests)
        answers, start = [], 0
        for r in requests:
            n = len(r["images"])
            answers.append((r, rows[start : start + n]))
            start += n
        return answers

    def run_padded(self, images: torch.Tensor) -> torch.Tensor:
        """The model on every image, in chunks of the largest batch size, each padded (with copies
        of its last image) to the next warmed size, so that no call meets an unwarmed shape."""
        outputs = []
        for start in range(0, len(images), self.sizes[-1]):
            chunk = images[start : start + self.sizes[-1]]
            n = len(chunk)
            size = next(s for s in self.sizes if s >= n)
            if size > n:
                chunk = torch.cat([chunk, chunk[-1:].expand(size - n, *chunk.shape[1:])])
            pre = self.card["preprocessing"]
            x = to_model_input(chunk.to(self.target, non_blocking=True), pre["mean"], pre["std"])
            outputs.append(self.compute(x)[:n].float().cpu())
        return torch.cat(outputs)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_image(self, outputs: torch.Tensor, requests: list) -> list:
        """The batch's outputs as one answer part per image (worked out for the whole batch at once)."""
        raise NotImplementedError

    def encode_response(self, output) -> dict:
        request, rows = output
        results = [self.answer(row, request) for row in rows]
        if request["single"]:
            return {"model": self.model_id, **results[0]}
        return {"model": self.model_id, "results": results}


class PredictAPI(ImageAPI):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, api_path="/predict", **kwargs)
        self.model_id = self.card["model_id"]

    def decode_request(self, request: Annotated[dict, Depends(read_predict_request)]):
        return request

    def compute(self, x):
        return self.model(x)

    def per_image(self, logits, requests):
        return topk_rows(logits, max(r["topk"] for r in requests), self.card)

    def answer(self, ranks, request) -> dict:
        return {"topk": ranks[: request["topk"]]}  # a prefix of a longer top-k is the shorter one


class EmbedAPI(ImageAPI):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, api_path="/embed", **kwargs)
        self.model_id = self.card["embed_model_id"]

    def decode_request(self, request: Annotated[dict, Depends(read_embed_request)]):
        return request

    def compute(self, x):
        return self.model.features(x)

    def per_image(self, features, requests):
        return features.tolist()

    def answer(self, features, request) -> dict:
        return {"features": features}


# -- the server ------------------------------------------------------------------------------


async def error_as_json(request, exc) -> JSONResponse:
    """Every error is one line of JSON, {"error": "..."}, whoever raised it (LitServe, FastAPI, us)."""
    if not isinstance(exc, (StarletteHTTPException, RequestValidationError)):  # a fault of ours, logged by uvicorn
        return JSONResponse({"error": "internal server error"}, status_code=500)
    if isinstance(exc, RequestValidationError):
        return JSONResponse(
            {"error": "invalid request: " + "; ".join(str(e.get("msg")) for e in exc.errors())}, status_code=400
        )
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def build_server(args, api_key: str | None = None, runner=None) -> ls.LitServer:
    """The LitServer for checked `serve` arguments; `runner(args, device)` builds each worker's model
    (default: a densetriton engine)."""
    card = model_card(args)
    runner = runner or densetriton_runner
    apis = [EmbedAPI(args, card, api_key, runner)]
    if card["classes"]:  # a backbone without a classifier has features only
        apis.insert(0, PredictAPI(args, card, api_key, runner))
    server = ls.LitServer(
        apis,
        accelerator="cpu" if args.devices == 0 else "auto",
        devices="auto" if args.devices in ("auto", 0) else args.devices,
        workers_per_device=args.workers_per_device,
        max_payload_size=int(args.max_body_mb * 2**20),
        model_metadata=public_card(card),
        timeout=args.request_timeout_s,
    )
    server.app.state.densetriton_reader = RequestReader(
        card["preprocessing"], int(args.max_body_mb * 2**20), card["input_shape"]
    )
    server.app.add_exception_handler(StarletteHTTPException, error_as_json)
    server.app.add_exception_handler(RequestValidationError, error_as_json)
    server.app.add_exception_handler(Exception, error_as_json)
    return server


def public_card(card: dict) -> dict:
    """GET /info's model part: the card without the class names (a thousand strings)."""
    shown = {k: v for k, v in card.items() if k not in ("class_names", "operating_points")}
    shown["endpoints"] = (["/predict"] if card["classes"] else []) + ["/embed"]
    return shown
