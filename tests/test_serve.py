"""`densetriton serve` started as a subprocess on 127.0.0.1 (a free port), reference backend on the
CPU, a tiny random-weight model: answers equal `densetriton predict` / `embed` and engine.features,
a mixed load of valid and invalid requests from 16 clients, and a shutdown that answers the requests
in flight. Every server is killed (its process group) in a finally.

What makes them fail: answering from anything but predict's preprocessing and probabilities (the
equality tests); decoding images in the worker, where LitServe answers a whole batch with one
request's error, or any refusal that is not its 4xx and one-line JSON (the load test); without
serve.Drain, a signal kills the main process and the requests it had received go unanswered (the
shutdown tests).
"""

import base64
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("litserve")

from helpers import randomize_batchnorm
from image_commands import CIFAR_SPEC, NAMES, PRE, PROB_TOL, SPEC, direct, make_images, one_thread, read_jsonl, run_cli  # noqa: F401

import densetriton
from densetriton.images import load_image, preprocess
from densetriton.reference import ReferenceDenseNet

HOST = "127.0.0.1"  # never any other address
KEY_VAR = "DENSETRITON_TEST_SERVE_KEY"
KEY = "k3y-for-tests"
POINTS = [0.3, None, 0.7]  # multi-label operating points: class "dog" has none (reads 0.5)
GOOD = ("exif", "gray", "rgba", "palette", "cmyk", "deep", "nested")
START_LIMIT_S = 150  # importing torch in three processes on a busy 2-core runner


# -- a server in a subprocess ------------------------------------------------------------------


def tiny_tensors(spec, seed: int) -> dict:
    """Random weights with BatchNorm statistics that fit the network's activations, and a
    classifier scaled up so that classes are well separated (no near-ties in top-k)."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(ReferenceDenseNet(spec), seed=seed, image_size=32, in_channels=spec.in_channels)
    with torch.no_grad():
        model.classifier.weight.mul_(8)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, weights: str, log: Path, *extra: str):
        self.port = free_port()
        argv = [
            sys.executable,
            "-m",
            "densetriton",
            "serve",
            "--weights",
            weights,
            "--backend",
            "reference",
            "--devices",
            "cpu",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--api-servers",
            "2",
            *extra,
        ]
        env = {**os.environ, KEY_VAR: KEY, "OMP_NUM_THREADS": "1"}
        self.log = log
        self.process = subprocess.Popen(
            argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )  # its own group: our signals only, and killable whole

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited:\n{self.log.read_text()[-3000:]}"
            try:
                if self.call("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"no /health 200 within {START_LIMIT_S} s:\n{self.log.read_text()[-3000:]}")

    def call(self, method: str, path: str, body: bytes = b"", headers: dict | None = None, timeout: float = 60):
        """(status, parsed JSON or text) of one request on a fresh connection."""
        connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode(errors="replace")

    def post(self, path: str, body: bytes, content_type: str, key: str | None = KEY, **kwargs):
        headers = {"Content-Type": content_type}
        if key is not None:
            headers["X-API-Key"] = key
        return self.call("POST", path, body, headers, **kwargs)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        try:  # its children, which a clean stop ends, and SIGKILL of the group too
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def multipart(blobs: list[bytes], fields: dict | None = None) -> tuple[bytes, str]:
    boundary = "densetriton-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in (fields or {}).items()
    ]
    for i, blob in enumerate(blobs):
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.img"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + blob + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def as_json(**document) -> bytes:
    return json.dumps(document).encode()


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    multi = densetriton.save_weights(
        root / "multi.safetensors",
        tiny_tensors(SPEC, 1),
        SPEC,
        class_names=NAMES,
        preprocessing=PRE,
        multi_label=True,
        operating_points=POINTS,
    )
    single = densetriton.save_weights(
        root / "single.safetensors", tiny_tensors(SPEC, 2), SPEC, class_names=NAMES, preprocessing=PRE
    )
    images = make_images(root / "images", "serve")
    bomb = root / "bomb.png"  # 20000 x 20000 declared, 400 KB on disk
    Image.new("L", (20000, 20000)).save(bomb, optimize=True)
    return {"root": root, "multi": str(multi), "single": str(single), "images": images, "bomb": bomb}


@pytest.fixture(scope="module")
def server(files):
    """The multi-label model, an API key, a 1 MiB body limit, batch sizes 1 4 8 (a gathered batch of
    2, 3, 5... is padded)."""
    srv = Server(
        files["multi"],
        files["root"] / "server.log",
        "--api-key-env",
        KEY_VAR,
        "--max-body-mb",
        "1",
        "--batch-sizes",
        "1",
        "4",
        "8",
        "--batch-timeout-ms",
        "20",
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.kill()


def read(path) -> bytes:
    return Path(path).read_bytes()


# -- answers ----------------------------------------------------------------------------------


def test_predict_equals_the_predict_command(server, files, capsys):
    folder = files["images"]["exif"].parent
    out = files["root"] / "predicted.jsonl"
    rc, _, _ = run_cli(
        capsys,
        "predict",
        folder,
        "--weights",
        files["multi"],
        "--backend",
        "reference",
        "--device",
        "cpu",
        "--topk",
        "3",
        "--out",
        out,
        "--workers",
        "0",
    )
    assert rc == 0
    expected = {Path(p).name: top for p, top in read_jsonl(out)}
    model = json.loads(out.read_text().splitlines()[0])["model"]
    for kind in GOOD:
        path = files["images"][kind]
        status, answer = server.post("/predict?topk=3", read(path), "application/octet-stream")
        assert status == 200, answer
        assert answer["model"] == model
        assert [(r["label"], r["index"]) for r in answer["topk"]] == [
            (n, NAMES.index(n)) for n, _ in expected[path.name]
        ]
        for r, (_, p) in zip(answer["topk"], expected[path.name]):
            assert abs(r["prob"] - p) <= PROB_TOL, (kind, r, p)


def test_several_images_answer_in_order_in_every_form(server, files):
    engine = densetriton.load(files["multi"], device="cpu", backend="reference")
    kinds = ["cmyk", "gray", "deep"]
    blobs = [read(files["images"][k]) for k in kinds]
    wanted = [[n for n, _ in direct(engine, files["images"][k], 2, multi_label=True)] for k in kinds]
    body, content_type = multipart(blobs, {"topk": "2"})
    answers = [
        server.post("/predict", body, content_type),
        server.post("/predict", as_json(images=[b64(b) for b in blobs], topk=2), "application/json"),
    ]
    for status, answer in answers:
        assert status == 200, answer
        assert [[r["label"] for r in result["topk"]] for result in answer["results"]] == wanted
    status, answer = server.post(
        "/predict", as_json(image="data:image/jpeg;base64," + b64(blobs[0])), "application/json"
    )
    assert status == 200 and [r["label"] for r in answer["topk"]][:2] == wanted[0] and len(answer["topk"]) == 3


def test_embed_equals_engine_features_and_the_embed_command(server, files, capsys):
    engine = densetriton.load(files["multi"], device="cpu", backend="reference")
    out = files["root"] / "feats.npy"
    rc, _, _ = run_cli(
        capsys,
        "embed",
        files["images"]["gray"],
        "--weights",
        files["multi"],
        "--backend",
        "reference",
        "--device",
        "cpu",
        "--out",
        out,
        "--workers",
        "0",
    )
    assert rc == 0
    model = json.loads(Path(str(out) + ".json").read_text())["model_id"]
    kinds = ["gray", "rgba", "nested"]
    status, answer = server.post(
        "/embed", as_json(images=[b64(read(files["images"][k])) for k in kinds]), "application/json"
    )
    assert status == 200, answer
    assert answer["model"] == model
    got = torch.tensor([r["features"] for r in answer["results"]])
    want = engine.features(preprocess([load_image(files["images"][k]) for k in kinds], engine))
    assert got.shape == want.shape
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    status, single = server.post("/embed", read(files["images"]["gray"]), "image/png")
    assert status == 200 and torch.allclose(torch.tensor(single["features"]), want[0], rtol=1e-5, atol=1e-6)


def test_info_and_health(server, files):
    status, info = server.call("GET", "/info")  # open without the key, as /health is for load balancers
    assert status == 200
    model = info["model"]
    assert model["model"] == files["multi"] and model["classes"] == 3 and model["features"] == SPEC.num_features
    assert model["multi_label"] is True and model["batch_sizes"] == [1, 4, 8]
    assert model["dtype"] == "float32" and model["backend"] == "reference" and model["input_shape"] == [3, 32, 32]
    assert model["preprocessing"] == PRE and info["server"]["devices"] == ["cpu"]
    assert server.call("GET", "/health")[0] == 200


# -- load: valid and invalid requests, 16 clients ------------------------------------------------


def request_cases(files) -> list[tuple]:
    """(path, body, content type, key, expected status, expected top-1 label or None)."""
    engine = densetriton.load(files["multi"], device="cpu", backend="reference")
    images = files["images"]
    valid = []
    for kind in GOOD:
        blob, top1 = read(images[kind]), direct(engine, images[kind], 1, multi_label=True)[0][0]
        valid.append(("/predict?topk=2", blob, "image/x-anything", KEY, 200, top1))  # batched with topk=1 ones
        valid.append(("/predict", as_json(image=b64(blob), topk=1), "application/json", KEY, 200, top1))
    oversized = b"\xff\xd8" + np.random.default_rng(0).bytes(int(1.2 * 2**20))
    too_many, form_type = multipart([read(images["gray"])] * 257)
    invalid = [
        ("/predict", read(images["corrupt"]), "image/jpeg", KEY, 400, None),
        ("/predict", read(images["fake"]), "image/png", KEY, 400, None),
        ("/embed", read(images["txt"]), "application/octet-stream", KEY, 400, None),
        ("/predict", read(images["gray"]), "text/plain", KEY, 415, None),
        ("/predict", b'{"image": ', "application/json", KEY, 400, None),
        ("/predict", as_json(image="not base64!"), "application/json", KEY, 400, None),
        ("/predict", as_json(image=b64(read(images["gray"])), topk=0), "application/json", KEY, 400, None),
        ("/predict", oversized, "image/jpeg", KEY, 413, None),
        ("/predict", too_many, form_type, KEY, 413, None),
        ("/predict", b"--not-the-boundary\r\n", form_type, KEY, 400, None),
        ("/predict", read(files["bomb"]), "image/png", KEY, 413, None),
        ("/predict", read(images["gray"]), "image/png", None, 401, None),
        ("/embed", read(images["gray"]), "image/png", "wrong", 401, None),
    ]
    return valid + invalid


def test_mixed_load_from_16_clients(server, files):
    cases = request_cases(files)
    rng = random.Random(0)
    load = [rng.choice(cases) for _ in range(240)]

    def send(case):
        path, body, content_type, key, _, _ = case
        return server.post(path, body, content_type, key=key)

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, load))
    elapsed = time.monotonic() - start
    for (path, _, content_type, key, status, top1), (got_status, answer) in zip(load, answers):
        assert got_status == status, (path, content_type, key, got_status, answer)
        if status == 200:
            assert answer["topk"][0]["label"] == top1, (path, content_type, answer)
            assert len(answer["topk"]) == (2 if path.endswith("topk=2") else 1), answer
        else:
            assert set(answer) == {"error"} and answer["error"] and "\n" not in answer["error"], answer
    assert {s for *_, s, _ in load} >= {200, 400, 401, 413, 415}
    assert server.call("GET", "/health")[0] == 200
    assert server.post("/predict?topk=1", read(files["images"]["gray"]), "image/png")[0] == 200
    assert elapsed < 120, elapsed


# -- shutdown ------------------------------------------------------------------------------------


def stat_fields(pid) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ... (OSError once the process is gone)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def forked_children(pid: int) -> list[int]:
    """The processes `pid` forked that still run its command line (LitServe's HTTP processes and
    queue manager; the spawned workers run multiprocessing's)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(stat_fields(entry.name)[1]) == pid:
                if b"densetriton" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            pass  # gone meanwhile
    return found


def answers_while_stopping(files, name: str, stop) -> tuple[list, "Server"]:
    """Requests wait in a batch (a 3 s timeout, the largest size never filled) when `stop(server)`
    signals it; (what each got, the server)."""
    kinds = ["gray", "cmyk", "rgba"]
    srv = Server(
        files["single"], files["root"] / f"{name}.log", "--batch-sizes", "1", "8", "--batch-timeout-ms", "3000"
    )
    srv.wait_healthy()
    with ThreadPoolExecutor(len(kinds)) as pool:
        pending = [pool.submit(srv.post, "/predict?topk=1", read(files["images"][k]), "image/png", None) for k in kinds]
        time.sleep(1.2)  # sent and waiting in the worker's batch
        assert not any(f.done() for f in pending)
        stop(srv)
        answers = [f.result(timeout=60) for f in pending]
    return list(zip(kinds, answers)), srv


def assert_answered_right(files, answers, srv) -> None:
    engine = densetriton.load(files["single"], device="cpu", backend="reference")
    for kind, (status, answer) in answers:
        assert status == 200, (answer, srv.log.read_text()[-4000:])
        name, prob = direct(engine, files["images"][kind], 1)[0]
        assert answer["topk"][0]["label"] == name and abs(answer["topk"][0]["prob"] - prob) <= PROB_TOL


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_answers_the_requests_in_flight(files, number):
    """The signal comes to every process of the server's group, as Ctrl-C and `systemctl stop`
    send it: each request is answered, right, and the server exits 0."""
    srv = None
    try:
        answers, srv = answers_while_stopping(files, f"stop-{number}", lambda s: os.killpg(s.process.pid, number))
        assert_answered_right(files, answers, srv)
        assert srv.process.wait(timeout=60) == 0
    finally:
        if srv is not None:
            srv.kill()


def test_a_ctrl_c_after_the_stop_does_not_drop_the_requests_in_flight(files):
    """An HTTP process that has begun stopping on SIGTERM and then gets a SIGINT (a Ctrl-C to the
    group arriving after the main process's SIGTERM) still answers what it holds: uvicorn's own
    handling would take the SIGINT as "force quit" and answer each with a bare 500."""

    def stop(srv):
        http_and_manager = forked_children(srv.process.pid)
        assert len(http_and_manager) == 3, http_and_manager  # --api-servers 2, and the manager
        for number in (signal.SIGTERM, signal.SIGINT):
            for pid in http_and_manager:
                os.kill(pid, number)
            time.sleep(0.05)

    srv = None
    try:
        answers, srv = answers_while_stopping(files, "sigterm-then-sigint", stop)
        assert_answered_right(files, answers, srv)
    finally:
        if srv is not None:
            srv.kill()


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit may wait for a reaper)."""
    try:
        return stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def test_http_processes_orphaned_by_a_killed_server_stop_on_ctrl_c(files):
    """The HTTP processes leave SIGINT to the main process; with the main process killed (SIGKILL,
    the OOM killer), a Ctrl-C still stops them, so they do not keep the port."""
    srv = Server(files["single"], files["root"] / "orphaned.log")
    try:
        srv.wait_healthy()
        forked = forked_children(srv.process.pid)  # the two HTTP processes and the queue manager
        os.kill(srv.process.pid, signal.SIGKILL)
        srv.process.wait(timeout=30)
        for pid in forked:
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and sum(map(running, forked)) > 1:
            time.sleep(0.2)
        assert sum(map(running, forked)) == 1, srv.log.read_text()[-3000:]  # the manager ignores SIGINT
    finally:
        srv.kill()


# -- refusals before serving ---------------------------------------------------------------------


def test_a_model_without_a_fixed_input_size_is_refused_before_serving(files, capsys, tmp_path):
    path = densetriton.save_weights(tmp_path / "cifar.safetensors", tiny_tensors(CIFAR_SPEC, 3), CIFAR_SPEC)
    rc, _, err = run_cli(capsys, "serve", "--weights", path, "--backend", "reference", "--port", str(free_port()))
    assert rc == 1 and "images of one size" in err and err.count("\n") == 1


def test_api_key_env_must_hold_a_key(files, capsys, monkeypatch):
    monkeypatch.delenv("DENSETRITON_TEST_UNSET_KEY", raising=False)
    rc, _, err = run_cli(
        capsys,
        "serve",
        "--weights",
        files["single"],
        "--api-key-env",
        "DENSETRITON_TEST_UNSET_KEY",
        "--port",
        str(free_port()),
    )
    assert rc == 1 and "DENSETRITON_TEST_UNSET_KEY" in err


# -- batching, in process ------------------------------------------------------------------------


def test_gathered_requests_run_in_warmed_batch_sizes_and_keep_their_answers(files):
    """A worker's predict on gathered requests of 1+2+3+5+11 images calls the model only at warmed
    sizes (chunks of the largest, the last padded), and every image gets its own answer."""
    from argparse import Namespace

    from densetriton.serve_app import PredictAPI, model_card
    from densetriton.serve_inputs import RequestReader

    args = Namespace(
        model=None,
        weights=files["single"],
        dtype=None,
        backend="reference",
        multi_label=None,
        devices=0,
        batch_sizes=[1, 4, 8],
        batch_timeout_ms=5.0,
        workers_per_device=1,
    )
    card = model_card(args)
    engine = densetriton.load(files["single"], device="cpu", backend="reference")
    sizes = []

    class Recording:  # the real engine, its batch sizes noted
        def __call__(self, x):
            sizes.append(len(x))
            return engine(x)

    api = PredictAPI(args, card, None)
    api.model, api.target = Recording(), torch.device("cpu")
    reader = RequestReader(card["preprocessing"], 1 << 20, card["input_shape"])
    kinds = list(GOOD) * 4
    counts, requests, start = [1, 2, 3, 5, 11], [], 0
    for n in counts:
        pixels = np.stack([reader.preprocess(read(files["images"][k]), "") for k in kinds[start : start + n]])
        requests.append({"images": pixels, "single": n == 1, "topk": 2})
        start += n
    answers = api.predict(requests)
    assert sizes == [8, 8, 8]  # 22 images: 8, 8, and 6 padded to 8
    got = [api.encode_response(a) for a in answers]
    flat = [got[0]["topk"]] + [r["topk"] for g in got[1:] for r in g["results"]]
    for kind, ranks in zip(kinds, flat):
        expected = direct(engine, files["images"][kind], 2)
        assert [r["label"] for r in ranks] == [n for n, _ in expected], kind
        assert all(abs(r["prob"] - p) <= PROB_TOL for r, (_, p) in zip(ranks, expected)), kind


@pytest.mark.parametrize(
    "pre", [PRE, {"resize_size": 40, "crop_size": 32, "mean": [0.45], "std": [0.22]}], ids=["rgb", "grayscale"]
)
def test_pixels_sent_to_the_worker_become_predicts_exact_input(files, pre):
    """The HTTP process's resize and crop (uint8) and the worker's to_model_input give, bit for bit,
    the tensor build_transform gives `densetriton predict`."""
    from densetriton.images import build_transform
    from densetriton.serve_inputs import RequestReader, to_model_input

    channels = len(pre["mean"])
    reader = RequestReader(pre, 1 << 20, (channels, 32, 32))
    transform = build_transform(pre)
    for kind in GOOD:
        path = files["images"][kind]
        pixels = torch.from_numpy(reader.preprocess(read(path), "")[None])
        got = to_model_input(pixels, pre["mean"], pre["std"])[0]
        assert torch.equal(got, transform(load_image(path))), kind


def test_without_litserve_serve_says_what_to_install(files, capsys, monkeypatch):
    """The command line works without the serve extra; `serve` then names the extra in one line."""
    monkeypatch.setitem(sys.modules, "litserve", None)  # import litserve -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "densetriton.serve_app", raising=False)
    rc, _, err = run_cli(capsys, "serve", "--weights", files["single"], "--port", str(free_port()))
    assert rc == 1 and 'pip install "densetriton[serve]"' in err and err.count("\n") == 1


def test_a_port_in_use_is_one_error_before_the_model_loads(files, capsys):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, _, err = run_cli(capsys, "serve", "--weights", files["single"], "--port", str(port))
    assert rc == 1 and f"port {port}" in err and err.count("\n") == 1
