"""Bad inputs, concurrent callers, memory limits, corrupt or hostile files, determinism."""

import json
import struct
import threading

import pytest
import torch
from helpers import rel_err
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import densetriton
from densetriton import DenseNetSpec
from densetriton.engine import Engine, random_weights
from densetriton.weights import WeightsError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, "imagenet")


def make_engine(spec=TINY, backend="triton", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    weights = random_weights(spec)
    # Non-trivial BatchNorm statistics, so a wrong fold or a dropped shift shows.
    g = torch.Generator().manual_seed(seed + 1)
    for name, t in weights.tensors.items():
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith(("running_mean", "bias")):
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    device = torch.device(DEVICE if backend == "triton" else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return Engine(weights, device=device, dtype=dtype, backend=backend, pretrained=False)


@pytest.fixture(scope="module", params=["reference", "triton"])
def engine(request):
    return make_engine(backend=request.param)


# -- inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda d: torch.randn(3, 40, 40, device=d), ValueError, r"rank 4.*got shape \(3, 40, 40\)"),
        (lambda d: torch.randn(1, 1, 3, 40, 40, device=d), ValueError, "rank 4"),
        (lambda d: torch.randn(2, 1, 40, 40, device=d), ValueError, r"3 channels.*\(2, 1, 40, 40\)"),
        (lambda d: torch.randn(2, 40, 40, 3, device=d), ValueError, "3 channels"),
        (
            lambda d: torch.randint(0, 255, (2, 3, 40, 40), dtype=torch.uint8, device=d),
            TypeError,
            "floating-point.*uint8",
        ),
        (lambda d: torch.ones(2, 3, 40, 40, dtype=torch.bool, device=d), TypeError, "floating-point.*bool"),
        (lambda d: torch.randn(2, 3, 40, 40, dtype=torch.complex64, device=d), TypeError, "floating-point.*complex64"),
        (lambda d: torch.randn(2, 3, 40, 40, device="meta"), ValueError, "expected a tensor on .*got one on meta"),
        (lambda d: torch.randn(1, 3, 4, 40, device=d), ValueError, "smallest input is 5x5"),
        (lambda d: [[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_name_what_was_expected(engine, make, error, match):
    x = make(engine.device)
    with pytest.raises(error, match=match):
        engine(x)
    with pytest.raises(error, match=match):
        engine.features(x)
    # and the engine still works
    assert engine(torch.randn(1, 3, 40, 40, device=engine.device)).shape == (1, 5)


def test_float64_input_is_computed_as_float32(engine):
    x = torch.randn(2, 3, 40, 40, device=engine.device)
    assert torch.equal(engine(x.double()), engine(x))


def test_empty_batch(engine):
    out = engine(torch.randn(0, 3, 40, 40, device=engine.device))
    assert out.shape == (0, 5) and out.dtype == torch.float32
    assert engine.features(torch.randn(0, 3, 40, 40, device=engine.device)).shape == (0, TINY.num_features)


def test_nan_and_inf_propagate_as_in_the_reference(engine):
    reference = make_engine(backend="reference")
    x = torch.randn(4, 3, 40, 40)
    x[0, 1, 5, 5] = float("nan")
    x[1, 0, 20, 20] = float("inf")
    x[2, 2, 0, 0] = -float("inf")
    expected = reference(x)
    got = engine(x.to(engine.device)).cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.isnan(got[0]).all() and torch.isfinite(got[3]).all()
    assert rel_err(got[3], expected[3]) < 1e-4


# -- concurrency ----------------------------------------------------------------------------


def test_threads_sharing_one_engine_get_their_own_results(engine):
    batches = [1, 3, 2, 1, 3, 2, 1, 2]
    inputs = [torch.randn(b, 3, 24, 24, device=engine.device) for b in batches]
    expected = [engine(x) for x in inputs]  # one at a time
    for got, want in zip(run_together(len(inputs), lambda i: engine(inputs[i])), expected):
        assert torch.equal(got, want)


def run_together(count, work):
    """work(i) for i < count, each on its own thread, all released at once; their results."""
    results, errors = [None] * count, []
    start = threading.Barrier(count)

    def run(i):
        try:
            start.wait()
            results[i] = work(i)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    return results


# -- memory ---------------------------------------------------------------------------------


def test_out_of_memory_is_one_clear_error_and_the_engine_recovers(monkeypatch):
    engine = make_engine(backend="triton")
    import densetriton.executor as executor_module

    real_plan = executor_module.Plan

    def plan_that_runs_out(spec, stages, folded, **kwargs):
        if kwargs["n"] >= 1000:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_plan(spec, stages, folded, **kwargs)

    monkeypatch.setattr(executor_module, "Plan", plan_that_runs_out)
    x = torch.randn(2, 3, 40, 40, device=engine.device)
    before = engine(x)
    wanted = engine._model.planned_bytes(4096, 40, 40)
    with pytest.raises(MemoryError, match=rf"batch 4096 at 40x40.*{wanted / 2**20:,.0f} MiB"):
        engine(torch.randn(4096, 3, 40, 40, device=engine.device))
    assert torch.equal(engine(x), before)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_batch_too_big_for_memory_is_one_clear_error_and_the_engine_recovers(backend):
    """No mock: the allocator itself refuses (an expanded input costs nothing to make)."""
    engine = make_engine(backend=backend)
    x = torch.randn(2, 3, 40, 40, device=engine.device)
    before = engine(x)
    # ~2 PB: more than a 48-bit address space, so refused even where the kernel overcommits.
    n = 10**11
    huge = torch.randn(1, 3, 40, 40, device=engine.device).expand(n, 3, 40, 40)
    # the plan's own count of what it needs, or what the allocator was asked for
    wanted = (
        r"building the plan for batch {n} at 40x40: its buffers need [\d,]+ MiB"
        if backend == "triton"
        else r"running batch {n} at 40x40 .*tried to allocate \d+ bytes"
    )
    with pytest.raises(MemoryError, match=wanted.format(n=n)):
        engine(huge)
    assert torch.equal(engine(x), before)


# -- files ----------------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path):
    torch.manual_seed(0)
    return densetriton.save_weights(
        tmp_path / "good.safetensors", random_weights(TINY).tensors, TINY, class_names=list("abcde")
    )


def _rewrite(src, dst, tensors=None, metadata=None):
    w = densetriton.load_weights(src)
    save_file(
        tensors if tensors is not None else w.tensors,
        str(dst),
        metadata=metadata if metadata is not None else w.metadata,
    )
    return dst


@pytest.mark.parametrize(
    "corrupt,match",
    [
        ("truncated", "not a readable safetensors file"),
        ("garbage", "not a readable safetensors file"),
        ("pickle", "not a readable safetensors file"),
        ("integer", "not floating point"),
        ("nan", "NaN or Inf"),
        ("spec-contradicts", "metadata contradicts its tensors"),
        ("float8", r"not floating point \(float16.*classifier.bias \(torch.float8_e4m3fn\)"),
        ("inf", "NaN or Inf values: features.norm5.running_mean"),
        ("negative-variance", "variances below zero: features.norm5.running_var"),
        ("class-names-contradict", "2 class names for a 5-class classifier"),
        ("class-names-not-a-list", "class names must be a list of strings"),
        ("preprocessing-not-a-dict", "preprocessing must be a dict"),
        ("preprocessing-bad-std", "std .* is not 3 numbers"),
        ("bad-json", "unreadable metadata"),
        ("future-version", "format version 9"),
        ("multi-label-not-a-bool", r"unreadable metadata \(multi_label is '\"yes\"', not true or false\)"),
    ],
)
def test_corrupt_files_give_one_clear_error(good_file, tmp_path, corrupt, match):
    bad = tmp_path / "bad.safetensors"
    w = densetriton.load_weights(good_file)
    if corrupt == "truncated":
        bad.write_bytes(good_file.read_bytes()[: good_file.stat().st_size // 2])
    elif corrupt == "garbage":
        bad.write_bytes(struct.pack("<Q", 40) + b"{not json at all" + bytes(100))
    elif corrupt == "pickle":
        torch.save(w.tensors, bad)
    elif corrupt == "integer":
        _rewrite(good_file, bad, tensors={**w.tensors, "classifier.bias": torch.arange(5)})
    elif corrupt == "nan":
        t = w.tensors["features.norm5.running_var"].clone()
        t[3] = float("nan")
        _rewrite(good_file, bad, tensors={**w.tensors, "features.norm5.running_var": t})
    elif corrupt == "float8":
        if not hasattr(torch, "float8_e4m3fn"):
            pytest.skip("this torch has no float8")
        _rewrite(
            good_file,
            bad,
            tensors={**w.tensors, "classifier.bias": w.tensors["classifier.bias"].to(torch.float8_e4m3fn)},
        )
    elif corrupt == "inf":
        t = w.tensors["features.norm5.running_mean"].clone()
        t[0] = float("inf")
        _rewrite(good_file, bad, tensors={**w.tensors, "features.norm5.running_mean": t})
    elif corrupt == "negative-variance":
        t = w.tensors["features.norm5.running_var"].clone()
        t[1] = -0.5
        _rewrite(good_file, bad, tensors={**w.tensors, "features.norm5.running_var": t})
    elif corrupt == "class-names-not-a-list":
        _rewrite(good_file, bad, metadata={**w.metadata, "class_names": "5"})
    elif corrupt == "preprocessing-not-a-dict":
        _rewrite(good_file, bad, metadata={**w.metadata, "preprocessing": json.dumps("abc")})
    elif corrupt == "preprocessing-bad-std":
        _rewrite(good_file, bad, metadata={**w.metadata, "preprocessing": json.dumps({"std": [0.2, 0.2]})})
    elif corrupt == "spec-contradicts":
        _rewrite(good_file, bad, metadata={**w.metadata, "spec": TINY.replace(growth_rate=6).to_json()})
    elif corrupt == "class-names-contradict":
        _rewrite(good_file, bad, metadata={**w.metadata, "class_names": json.dumps(["a", "b"])})
    elif corrupt == "bad-json":
        _rewrite(good_file, bad, metadata={**w.metadata, "spec": "{growth_rate: 4"})
    elif corrupt == "future-version":
        _rewrite(good_file, bad, metadata={**w.metadata, "format_version": "9"})
    elif corrupt == "multi-label-not-a-bool":
        _rewrite(good_file, bad, metadata={**w.metadata, "multi_label": json.dumps("yes")})
    with pytest.raises(WeightsError, match=match):
        densetriton.load(bad, device="cpu")


def test_metadata_as_torchvision_takes_it_is_accepted(tmp_path):
    """Tuples for mean/std, a (h, w) crop, integer labels: what torchvision and older files use."""
    torch.manual_seed(0)
    tensors = random_weights(TINY).tensors
    pre = {"resize_size": 256, "crop_size": (224, 200), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    path = densetriton.save_weights(tmp_path / "w.safetensors", tensors, TINY, class_names=range(5), preprocessing=pre)
    w = densetriton.load_weights(path)
    assert w.class_names == ["0", "1", "2", "3", "4"] and w.preprocessing["crop_size"] == [224, 200]
    with pytest.raises(WeightsError, match="class names must be a list of strings"):
        densetriton.save_weights(tmp_path / "x.safetensors", tensors, TINY, class_names="abcde")
    assert not (tmp_path / "x.safetensors").exists()


def test_files_written_atomically_get_the_permissions_open_would_give(tmp_path):
    import os

    from densetriton.atomic import atomic_write

    tensors = random_weights(TINY).tensors
    old = os.umask(0o022)
    try:
        path = densetriton.save_weights(tmp_path / "w.safetensors", tensors, TINY)
        assert path.stat().st_mode & 0o777 == 0o644  # readable by a team, as open() would make it; not mkstemp's 0o600
        os.umask(0o077)
        assert (
            atomic_write(tmp_path / "private.txt", lambda tmp: open(tmp, "w").write("x")).stat().st_mode & 0o777
        ) == 0o600
        os.chmod(path, 0o640)  # a file replaced keeps its own permissions
        densetriton.save_weights(path, tensors, TINY)
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    # A link is written through, as open() would: the link stays a link, its target is replaced.
    (tmp_path / "store").mkdir()
    target, link = tmp_path / "store" / "results.txt", tmp_path / "results.txt"
    target.write_text("old")
    link.symlink_to(target)
    atomic_write(link, lambda tmp: open(tmp, "w").write("new"))
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["results.txt"]  # no temporary left


def test_a_failed_conversion_leaves_no_file_in_the_cache(cache_home, monkeypatch):
    import pathlib

    import torchvision
    from densetriton.weights_tools.convert import torchvision_weights

    from densetriton.engine import pretrained_path

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("No space left on device")

    torch.manual_seed(0)
    sd = torchvision.models.densenet121().state_dict()
    download = (
        pathlib.Path(torch.hub.get_dir()) / "checkpoints" / pathlib.Path(torchvision_weights("densenet121").url).name
    )
    download.parent.mkdir(parents=True)
    torch.save(sd, download)
    monkeypatch.setattr(
        "densetriton.weights_tools.convert.check_torchvision_file", lambda path: None
    )  # a stand-in file
    monkeypatch.setattr("safetensors.torch.save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        densetriton.load("densenet121", device="cpu")
    cache = pretrained_path("densenet121").parent
    assert not cache.exists() or list(cache.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("DENSETRITON_HOME", str(cache_home / "densetriton-cache"))
    monkeypatch.setenv("TORCH_HOME", str(cache_home / "torch-home"))
    monkeypatch.setattr("densetriton.weights_tools.convert.check_torchvision_file", lambda path: None)
    assert densetriton.load("densenet121", device="cpu").pretrained
    assert [p.name for p in cache.iterdir()] == ["densenet121-IMAGENET1K_V1.safetensors"]


# -- determinism ----------------------------------------------------------------------------


def test_same_input_same_bits_across_calls_and_rebuilt_plans(good_file):
    x = torch.randn(3, 3, 40, 40, device=DEVICE)
    first = densetriton.load(good_file, device=DEVICE, backend="triton", dtype=torch.float32)
    a, b = first(x), first(x)
    first.release()
    c = first(x)
    d = densetriton.load(good_file, device=DEVICE, backend="triton", dtype=torch.float32)(x)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


# -- property: any small spec, any input size -------------------------------------------------


@st.composite
def specs_and_sizes(draw):
    blocks = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    stem = draw(st.sampled_from(["imagenet", "cifar"]))
    fields = dict(
        growth_rate=draw(st.integers(1, 9)),
        block_config=blocks,
        num_init_features=draw(st.integers(1, 12)),
        bn_size=draw(st.one_of(st.none(), st.integers(1, 4))),
        compression=draw(st.sampled_from([0.5, 0.7, 1.0, 0.3])),
        num_classes=draw(st.integers(0, 20)),  # 0: a backbone without a classifier
        stem=stem,
        in_channels=draw(st.sampled_from([3, 1, 2, 4])),
        bn_eps=draw(st.sampled_from([1e-5, 1.001e-5, 1e-3, 0.1])),  # 0.1 moves results by percent
    )
    try:
        spec = DenseNetSpec(**fields)
    except ValueError:  # a compression that leaves a transition no channel: refused, not a case
        assume(False)
    smallest = spec.min_input_size()
    h = draw(st.integers(smallest, smallest + 9))
    w = draw(st.integers(smallest, smallest + 9))
    return spec, draw(st.integers(1, 3)), h, w


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(specs_and_sizes(), st.integers(0, 2**31 - 1))
def test_triton_backend_equals_the_reference_on_random_specs(case, seed):
    spec, batch, h, w = case
    triton_engine = make_engine(spec, backend="triton", seed=seed % 1000)
    reference = make_engine(spec, backend="reference", seed=seed % 1000)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.in_channels, h, w, generator=g)
    if spec.num_classes:
        assert rel_err(triton_engine(x.to(triton_engine.device)), reference(x)) < 1e-4
    assert rel_err(triton_engine.features(x.to(triton_engine.device)), reference.features(x)) < 1e-4


# -- on the GPU -----------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_threads_on_their_own_streams_with_mixed_batches():
    engine = densetriton.load("densenet121", weights=None, device="cuda", dtype=torch.float16)
    batches = [1, 8, 3, 16, 1, 8, 3, 16]
    inputs = [torch.randn(b, 3, 224, 224, device="cuda") for b in batches]
    expected = [engine(x) for x in inputs]
    torch.cuda.synchronize()

    def on_own_stream(i):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for _ in range(5):
                out = engine(inputs[i])
        stream.synchronize()
        return out

    for got, want in zip(run_together(len(inputs), on_own_stream), expected):
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_soak_10000_calls_without_memory_growth():
    engine = densetriton.load("densenet121", weights=None, device="cuda", dtype=torch.float16)
    sizes = [1, 2, 4, 8]
    inputs = {b: torch.randn(b, 3, 224, 224, device="cuda") for b in sizes}
    reference = {b: engine(x) for b, x in inputs.items()}  # builds every plan
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    for i in range(10_000):
        b = sizes[int(torch.randint(len(sizes), (1,), generator=g))]
        out = engine(inputs[b])
        if i % 1000 == 0:
            assert torch.equal(out, reference[b])
    del out
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline
    # the only allocation per call is the returned logits
    assert torch.cuda.max_memory_allocated() - baseline <= 4 * max(sizes) * 1000 * 4 + (1 << 20)
