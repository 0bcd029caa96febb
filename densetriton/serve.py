"""`densetriton serve`: an HTTP inference server on LitServe, with dynamic batching into warmed batch sizes.

    densetriton serve --model densenet121                      # http://127.0.0.1:8000
    curl -H "Content-Type: image/jpeg" --data-binary @cat.jpg http://127.0.0.1:8000/predict

Endpoints: POST /predict (top-k labels), POST /embed (engine.features), GET /health (200 once every
worker has warmed every batch size), GET /info (the model and the server).

How a request travels. An HTTP process (uvicorn, LitServe forks --api-servers of them) reads it
(serve_inputs: the body, the images decoded and preprocessed as `densetriton predict` does them, the
4xx refusals) and queues it; an inference worker (one per device and --workers-per-device, each
with its own engine) gathers queued requests up to the largest batch size or --batch-timeout-ms,
pads the batch up to the next warmed size -- so on CUDA every call replays a captured graph and
nothing is compiled under traffic -- and answers each request. /predict and /embed are two LitAPIs
with their own workers and queues.

Stopping: SIGINT or SIGTERM to the main process stops accepting connections, answers every request
already received, then stops the workers.
"""

import argparse
import multiprocessing
import os
import signal
import socket
import sys

DEFAULT_BATCH_SIZES = (1, 8, 32, 64)
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # the addresses LitServe binds
DRAIN_SECONDS = 30  # how long a stopping server waits for the requests it has received (uvicorn's grace)
WORKER_NAME = "inference-worker"  # what LitServe names its inference processes


# -- stopping --------------------------------------------------------------------------------


class Drain:
    """SIGINT/SIGTERM in the main process: the HTTP processes get SIGTERM (uvicorn stops accepting
    and answers the requests it has, while the workers still compute), then the workers, which
    ignore SIGINT and SIGTERM (Ctrl-C and `systemctl stop` signal every process of the group), get
    SIGUSR1, and LitServe stops the rest as on Ctrl-C. A second signal kills the HTTP processes and
    the workers, giving up the requests in flight.

    The HTTP processes stop on SIGTERM only and ignore SIGINT: uvicorn takes a SIGINT that follows
    another signal as "force quit" and answers the requests it holds with a bare 500, and a Ctrl-C
    reaches them beside the main process's SIGTERM."""

    def __init__(self):
        self.main_pid = os.getpid()
        self.stopping = False

    def install(self) -> None:
        import uvicorn.server

        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self.handle)
        # Read by uvicorn when each HTTP process (forked from this one) starts serving: the
        # signals it handles itself, leaving SIGINT to self.handle.
        uvicorn.server.HANDLED_SIGNALS = (signal.SIGTERM,)

    def handle(self, number, frame):
        if os.getpid() != self.main_pid:  # a process forked from this one, which inherits this handler:
            if multiprocessing.current_process().name.startswith("LitServer-"):
                if number == signal.SIGTERM:
                    raise SystemExit(0)  # an HTTP process whose uvicorn has answered its requests and stopped
                if os.getppid() != self.main_pid:  # orphaned (the main process killed): stop as on SIGTERM
                    os.kill(os.getpid(), signal.SIGTERM)
            return  # a Ctrl-C to an HTTP process (the main one stops it), or LitServe's queue manager
        children = multiprocessing.active_children()
        if self.stopping:  # a second signal: the requests in flight are given up
            for process in children:
                if process.name.startswith("LitServer-") or process.name == WORKER_NAME:
                    process.kill()
            raise KeyboardInterrupt
        self.stopping = True
        http = [p for p in children if p.name.startswith("LitServer-")]
        for process in http:
            process.terminate()
        for process in http:
            process.join(DRAIN_SECONDS + 5)
        for process in children:
            if process.name == WORKER_NAME and process.pid is not None:
                os.kill(process.pid, signal.SIGUSR1)  # every request it had is answered
                process.join(10)
        raise KeyboardInterrupt  # LitServer.run's own shutdown: transport, workers, manager


def stop_children() -> None:
    """Processes LitServe started and did not stop (a signal during warm-up, before its shutdown
    path): the workers ignore SIGTERM, so what a short wait does not see end is killed."""
    children = multiprocessing.active_children()
    for process in children:
        process.terminate()
    for process in children:
        process.join(2)
        if process.is_alive():
            process.kill()
            process.join(5)


# -- the command line ----------------------------------------------------------------------


def devices_arg(text: str):
    if text == "auto":
        return "auto"
    if text == "cpu":
        return 0
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected auto, cpu or a number of GPUs >= 1, got {text!r}")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def register(subparsers) -> None:
    """Add the `serve` subcommand to densetriton's command line."""
    from .spec import list_models
    from .stream import positive_int

    p = subparsers.add_parser(
        "serve",
        help="an HTTP inference server (LitServe): /predict, /embed, /health, /info",
        description="An HTTP inference server on LitServe: requests are gathered into batches, padded to a batch size\n"
        'warmed before traffic (on CUDA every call replays a captured graph). Needs pip install "densetriton[serve]".',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=SERVE_EPILOG,
    )
    _add_model_arguments(p.add_argument_group("model"), list_models())
    _add_server_arguments(p.add_argument_group("server"), positive_int)
    p.set_defaults(func=serve_command)


def _add_model_arguments(g, models) -> None:
    from .stream import add_dtype_and_backend

    g.add_argument(
        "--model",
        choices=models,
        metavar="NAME",
        help="a registry model: torchvision's pretrained weights; with --weights, the architecture the file must hold",
    )
    g.add_argument("--weights", metavar="FILE", help="a weights file (.safetensors, see `densetriton convert`)")
    add_dtype_and_backend(g)
    g.add_argument(
        "--multi-label",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a sigmoid per class, as predict --multi-label (default: what the weights file records)",
    )


def _add_server_arguments(g, positive_int) -> None:
    g.add_argument(
        "--host", default="127.0.0.1", choices=HOSTS, help="address to bind (default 127.0.0.1: this machine only)"
    )
    g.add_argument("--port", type=int, default=8000, help="port, 1024-65535 (default 8000)")
    g.add_argument(
        "--batch-sizes",
        type=positive_int,
        nargs="+",
        default=list(DEFAULT_BATCH_SIZES),
        metavar="N",
        help="the batch sizes warmed before traffic; requests are gathered up to the largest (default 1 8 32 64)",
    )
    g.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="how long a worker waits to fill a batch (default 5)",
    )
    g.add_argument(
        "--devices",
        type=devices_arg,
        default="auto",
        metavar="auto|cpu|N",
        help="GPUs to serve on: auto (every GPU, else the CPU), cpu, or the first N",
    )
    g.add_argument(
        "--workers-per-device",
        type=positive_int,
        default=1,
        metavar="N",
        help="inference workers per device, each with its own engine (default 1)",
    )
    g.add_argument(
        "--api-servers",
        type=positive_int,
        metavar="N",
        help="HTTP processes, which read and preprocess images (default: min(8, CPU cores))",
    )
    g.add_argument(
        "--max-body-mb",
        type=positive_float,
        default=20.0,
        metavar="MB",
        help="largest request body (default 20 MiB): 413 above",
    )
    g.add_argument(
        "--request-timeout-s",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="a request waiting longer than this in the queue is answered 504 (default 30)",
    )
    g.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require the key held in environment variable VAR (X-API-Key or "
        "Authorization: Bearer); 401 without it. /health and /info stay open",
    )
    g.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="uvicorn's and LitServe's logging; info shows every request (default warning)",
    )


SERVE_EPILOG = """
Requests: POST /predict or /embed with one image as the body (Content-Type image/* or
application/octet-stream), multipart/form-data field `file` (several allowed), or JSON
{"image": "<base64>"} / {"images": ["<base64>", ...]}; topk as ?topk=K or a field (default 5).
Answers: {"model": ID, "topk": [{"label", "index", "prob"}, ...]} or {"model": ID, "features": [...]},
{"model": ID, "results": [...]} for several images. Errors: {"error": "..."} with 400 (not an image,
corrupt, malformed), 401 (no key), 413 (body or image too large), 415 (content type).

Examples:
  densetriton serve --model densenet121
  densetriton serve --weights chexnet.safetensors --batch-sizes 1 16 64 --api-key-env SERVE_KEY
  curl -H "Content-Type: image/jpeg" --data-binary @cat.jpg "http://127.0.0.1:8000/predict?topk=3"
"""


def check_args(args) -> None:
    if args.model is None and args.weights is None:
        raise ValueError(
            "give --model NAME (torchvision's pretrained weights) or --weights FILE (a converted weights file)"
        )
    if not 1024 <= args.port <= 65535:
        raise ValueError(f"--port must be from 1024 to 65535, got {args.port}")
    check_port_free(args.host, args.port)
    if args.batch_timeout_ms < 0:
        raise ValueError(f"--batch-timeout-ms must be >= 0, got {args.batch_timeout_ms:g}")
    if args.batch_timeout_ms / 1000 >= args.request_timeout_s:
        raise ValueError("--batch-timeout-ms must be shorter than --request-timeout-s")
    args.batch_sizes = sorted(set(args.batch_sizes))


def check_port_free(host: str, port: int) -> None:
    """One clear error before the model is loaded, rather than uvicorn's after it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(
                f"cannot listen on {host} port {port}: {e.strerror or e} (another server? --port)"
            ) from None


def read_api_key(variable: str | None) -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable, "").strip()
    if not key:
        raise ValueError(f"--api-key-env {variable}: that environment variable is not set or is empty")
    return key


def serve(args, runner=None) -> int:
    """Build the server, run it until SIGINT/SIGTERM, stop it cleanly. `runner(args, device)` builds
    each worker's model (default: a densetriton engine; the serving bench passes torchvision's)."""
    check_args(args)
    api_key = read_api_key(args.api_key_env)
    try:
        import torch

        from .serve_app import build_server
    except ModuleNotFoundError as e:
        raise ValueError(f'densetriton serve needs {e.name}: pip install "densetriton[serve]"') from None
    torch.set_num_threads(1)  # the HTTP processes are forked from this one: one image per thread there
    server = build_server(args, api_key, runner)
    api_servers = args.api_servers or max(1, min(8, os.cpu_count() or 1))
    where = f"http://{'[::]' if args.host == '::' else args.host}:{args.port}"
    endpoints = ", ".join(server.model_metadata["endpoints"] + ["/health", "/info"])
    print(
        f"densetriton serve: {server.model_metadata['model']} on {where} ({endpoints}); "
        f"warming batch sizes {' '.join(map(str, args.batch_sizes))} before /health answers 200",
        file=sys.stderr,
    )
    Drain().install()
    try:
        server.run(
            host=args.host,
            port=args.port,
            num_api_servers=api_servers,
            log_level=args.log_level,
            generate_client_file=False,
        )
    except KeyboardInterrupt:  # stopped before LitServe's own shutdown path was reached
        pass
    finally:
        stop_children()
    return 0


def serve_command(args) -> int:
    return serve(args)
