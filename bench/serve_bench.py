"""The serving bench: `densetriton serve` around densetriton's engine and, as the peer, the same
server around torchvision's model (float16 channels_last eager on CUDA; float32 channels_last on the
CPU, where 16-bit convolutions are emulated), with clients sending JPEGs to /predict.

    python -m densetriton.bench.serve_bench --out bench/results/serve.json     # GPU: 1, 8, 64 clients
    python -m densetriton.bench.serve_bench --quick                            # CPU: tiny settings

For each peer a server starts on 127.0.0.1 (its own process group, stopped with SIGTERM), /health
is awaited (every batch size warmed), every distinct JPEG is classified once (top-1 agreement
between the peers is reported), then at each concurrency C, C clients (threads in a few client
processes, one keep-alive connection each) send requests back to back: a warm-up period, then a
measured one. Reported per peer and C: images/s (requests answered within the measured period /
its length; one image per request), latency p50 and p99 of the requests sent and answered within
it, errors. Both peers run the same weights (the cached pretrained file, else calibrated random
weights: bench/peers.py) behind the same server code, so the difference is the model.
"""

import argparse
import http.client
import io
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

PEERS = ("densetriton", "torchvision-eager-fp16-cl")
HOST = "127.0.0.1"


# -- the torchvision peer inside the server ------------------------------------------------------


class TorchvisionModel:
    """torchvision's DenseNet with an Engine's call, features and warmup, for `serve`'s workers."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype, image_size: tuple):
        self.net, self.dtype, self.image_size = net, dtype, image_size
        self.device = next(net.parameters()).device

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(x)).float()

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.nn.functional.relu(self.net.features(self.prepare(x)))
        return torch.nn.functional.adaptive_avg_pool2d(maps, 1).flatten(1).float()

    def warmup(self, batch_sizes) -> None:
        for n in sorted(batch_sizes, reverse=True):
            self(torch.rand(n, 3, *self.image_size, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def torchvision_runner(args, device: str) -> TorchvisionModel:
    """`serve`'s runner for the peer: the weights file's tensors in torchvision's DenseNet."""
    from densetriton.bench.peers import load_weights_into, torchvision_model

    from densetriton.images import resolve_preprocessing
    from densetriton.serve_app import fixed_input_size
    from densetriton.weights import default_preprocessing, load_weights

    weights = load_weights(args.weights)
    net = load_weights_into(torchvision_model(args.model, weights.spec), weights.tensors).eval()
    dtype = getattr(torch, args.dtype)
    net = net.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    pre = resolve_preprocessing(weights.preprocessing or default_preprocessing(weights.spec))
    return TorchvisionModel(net, dtype, fixed_input_size(pre))


def run_server(peer: str, serve_argv: list[str]) -> int:
    """The child process: `densetriton serve` with the peer's runner."""
    from densetriton.cli import build_parser
    from densetriton.serve import serve

    args = build_parser().parse_args(["serve", *serve_argv])
    return serve(args, runner=torchvision_runner if peer != "densetriton" else None)


# -- requests --------------------------------------------------------------------------------


def make_jpegs(count: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """Distinct JPEGs (quality 90) of smooth and fine random structure, as photos have at every scale."""
    from densetriton.bench.peers import bench_images
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    side = max(width, height)
    blobs = []
    for image in bench_images(count, side, generator=g)[:, :, :height, :width]:
        lo, hi = image.amin(), image.amax()
        pixels = ((image - lo) / (hi - lo) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def post(connection: http.client.HTTPConnection, blob: bytes) -> tuple[int, bytes]:
    connection.request("POST", "/predict?topk=1", body=blob, headers={"Content-Type": "image/jpeg"})
    response = connection.getresponse()
    return response.status, response.read()


def client_thread(port: int, blobs: list[bytes], offset: int, stop: float) -> list[tuple[float, float, int]]:
    """Requests back to back until `stop`: (sent, answered, status) of each."""
    connection = http.client.HTTPConnection(HOST, port, timeout=120)
    timings, i = [], offset
    try:
        while time.time() < stop:
            sent = time.time()
            status, _ = post(connection, blobs[i % len(blobs)])
            timings.append((sent, time.time(), status))
            i += 1
    finally:
        connection.close()
    return timings


def client_process(port, blobs, threads, first, stop):
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(client_thread, port, blobs, first + t, stop) for t in range(threads)]
        return [timing for f in futures for timing in f.result()]


def measure(port: int, blobs: list[bytes], clients: int, warmup_s: float, measure_s: float, processes: int) -> dict:
    """At `clients` concurrent clients (spread over up to `processes` processes): images/s, the
    answers that came within the measured period over its length; latency percentiles of the
    requests sent and answered within it; errors, the non-200 answers of the whole run."""
    procs = min(processes, clients)
    shares = [clients // procs + (1 if p < clients % procs else 0) for p in range(procs)]
    start = time.time() + warmup_s + 0.5  # 0.5 s for the client processes to start
    stop = start + measure_s
    firsts = np.cumsum([0] + shares[:-1]).tolist()
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        runs = pool.starmap(client_process, [(port, blobs, n, f, stop) for n, f in zip(shares, firsts)])
    timings = [t for run in runs for t in run]
    answered = [(sent, done) for sent, done, status in timings if status == 200 and start <= done <= stop]
    latencies = np.array([done - sent for sent, done in answered if sent >= start])
    record = {
        "clients": clients,
        "requests": len(answered),
        "errors": sum(status != 200 for *_, status in timings),
        "images_per_s": len(answered) / measure_s,
        "latency_samples": int(latencies.size),
    }
    if latencies.size:
        record.update(
            p50_ms=float(np.percentile(latencies, 50) * 1000), p99_ms=float(np.percentile(latencies, 99) * 1000)
        )
    return record


# -- one server per peer -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def health(port: int) -> int | None:
    try:
        connection = http.client.HTTPConnection(HOST, port, timeout=5)
        connection.request("GET", "/health")
        return connection.getresponse().status
    except OSError:
        return None


def start_server(peer: str, opts, weights: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = [
        "--model",
        opts.model,
        "--weights",
        str(weights),
        "--host",
        HOST,
        "--port",
        str(port),
        "--batch-sizes",
        *map(str, opts.batch_sizes),
        "--batch-timeout-ms",
        str(opts.batch_timeout_ms),
        "--dtype",
        opts.peer_dtypes[peer],
        "--devices",
        opts.devices,
    ]
    if opts.api_servers:
        argv += ["--api-servers", str(opts.api_servers)]
    process = subprocess.Popen(
        [sys.executable, "-m", "densetriton.bench.serve_bench", "--run-server", peer, "--", *argv],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + opts.start_timeout_s
    while health(port) != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(process)
            raise RuntimeError(f"the {peer} server did not become healthy; its log {log}:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return process, port


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def top1(port: int, blobs: list[bytes]) -> list[int]:
    connection = http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        answers = [post(connection, blob) for blob in blobs]
    finally:
        connection.close()
    return [json.loads(body)["topk"][0]["index"] if status == 200 else -1 for status, body in answers]


def bench_peer(peer: str, opts, weights: Path, blobs: list[bytes], workdir: Path) -> dict:
    started = time.monotonic()
    process, port = start_server(peer, opts, weights, workdir / f"server-{peer}.log")
    try:
        ready_s = time.monotonic() - started
        labels = top1(port, blobs)
        records = []
        for clients in opts.concurrency:
            records.append(measure(port, blobs, clients, opts.warmup_s, opts.duration_s, opts.client_processes))
            print(f"  {peer:28s} {format_record(records[-1])}", file=sys.stderr)
    finally:
        stop_server(process)
    return {"peer": peer, "dtype": opts.peer_dtypes[peer], "ready_s": ready_s, "top1": labels, "records": records}


def format_record(r: dict) -> str:
    latency = f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms" if r["latency_samples"] else "no latency sample"
    return f"{r['clients']:3d} clients: {r['images_per_s']:9.1f} images/s, {latency}, {r['errors']} errors"


# -- the report ----------------------------------------------------------------------------------


def markdown(document: dict) -> str:
    peers = document["peers"]
    lines = [
        f"# Serving bench: {document['model']} on {document['device']}",
        "",
        f"{document['settings']}",
        "",
        "| peer | clients | images/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in peers:
        for r in p["records"]:
            lines.append(
                f"| {p['peer']} ({p['dtype']}) | {r['clients']} | {r['images_per_s']:.1f} | "
                f"{r.get('p50_ms', float('nan')):.1f} | {r.get('p99_ms', float('nan')):.1f} | {r['errors']} |"
            )
    if len(peers) == 2:
        lines += ["", "| clients | densetriton / peer images/s |", "|---:|---:|"]
        for a, b in zip(peers[0]["records"], peers[1]["records"]):
            ratio = f"{a['images_per_s'] / b['images_per_s']:.2f}x" if b["images_per_s"] else "n/a"
            lines.append(f"| {a['clients']} | {ratio} |")
        same = sum(x == y for x, y in zip(peers[0]["top1"], peers[1]["top1"]))
        lines += ["", f"Top-1 agreement between the peers on the {len(peers[0]['top1'])} JPEGs: {same}."]
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict:
    import litserve

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {
        "device": name,
        "torch": torch.__version__,
        "litserve": litserve.__version__,
        "python": sys.version.split()[0],
    }


def parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m densetriton.bench.serve_bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default="densenet121", help="a registry model with torchvision's layout (default densenet121)"
    )
    p.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64], metavar="C")
    p.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per concurrency (default 10)")
    p.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each (default 3)")
    p.add_argument("--jpegs", type=int, default=64, help="distinct JPEGs sent round robin (default 64)")
    p.add_argument(
        "--jpeg-size",
        type=int,
        nargs=2,
        default=[500, 375],
        metavar=("W", "H"),
        help="JPEG width and height (default 500 375, ImageNet's typical photo)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="serve at NxN (resize N*8/7, crop N; default: the weights' own, 224 for torchvision's)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64], metavar="N")
    p.add_argument("--batch-timeout-ms", type=float, default=5.0)
    p.add_argument("--api-servers", type=int, help="the servers' HTTP processes (default: serve's)")
    p.add_argument("--client-processes", type=int, default=4, help="processes the clients are spread over (default 4)")
    p.add_argument("--devices", default="auto", help="serve's --devices (default auto; cpu for the CPU)")
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--out", type=Path, help="write the results to this .json and a .md beside it")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU-sized: 1 and 8 clients, 3 s each, batch sizes 1 8, 64x64 images from small JPEGs",
    )
    opts = p.parse_args(argv)
    if opts.quick:
        opts.concurrency, opts.duration_s, opts.warmup_s, opts.jpegs = [1, 8], 3.0, 1.0, 8
        opts.jpeg_size, opts.batch_sizes, opts.client_processes, opts.image_size = [160, 120], [1, 8], 2, 64
    return opts


def served_weights(opts, workdir: Path):
    """bench/peers.py's weights (pretrained when cached, else calibrated random), with --image-size's
    preprocessing when given."""
    from densetriton.bench.peers import prepare_weights

    from densetriton.weights import IMAGENET_PREPROCESSING, save_weights

    weights = prepare_weights(opts.model, workdir, seed=0)
    if opts.image_size is None:
        return weights.path, weights.source
    size = opts.image_size
    pre = {**IMAGENET_PREPROCESSING, "resize_size": round(size * 8 / 7), "crop_size": size}
    path = save_weights(
        workdir / f"{opts.model}-{size}.safetensors",
        weights.tensors,
        weights.spec,
        preprocessing=pre,
        source=weights.source,
    )
    return path, f"{weights.source}; served at {size}x{size}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-server"]:  # the server child: --run-server PEER -- serve options
        return run_server(argv[1], argv[3:])
    opts = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and opts.devices != "cpu" else "cpu")
    # float16 on CUDA; on the CPU float32 for both, where 16-bit convolutions are emulated (slow).
    opts.peer_dtypes = {p: "float16" if device.type == "cuda" else "float32" for p in opts.peers}
    workdir = Path(os.environ.get("DENSETRITON_SERVE_BENCH_DIR", "/tmp/densetriton-serve-bench"))
    workdir.mkdir(parents=True, exist_ok=True)
    weights_path, source = served_weights(opts, workdir)
    blobs = make_jpegs(opts.jpegs, *opts.jpeg_size)
    settings = (
        f"{len(blobs)} JPEGs of {opts.jpeg_size[0]}x{opts.jpeg_size[1]} to /predict?topk=1; batch sizes "
        f"{' '.join(map(str, opts.batch_sizes))}, batch timeout {opts.batch_timeout_ms:g} ms; "
        f"{opts.warmup_s:g} s warm-up and {opts.duration_s:g} s measured per concurrency; weights: {source}"
    )
    print(f"serve_bench: {opts.model} on {device}: {settings}", file=sys.stderr)
    peers = [bench_peer(peer, opts, weights_path, blobs, workdir) for peer in opts.peers]
    document = {"model": opts.model, **environment(device), "settings": settings, "peers": peers}
    text = markdown(document)
    print(text)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(document, indent=1) + "\n")
        opts.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
