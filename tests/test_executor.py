"""Whole networks through backend="triton" (Triton's interpreter on CPU, the GPU when there is one)."""

import os
import subprocess
import sys

import pytest
import torch
import torchvision
from densetriton.weights_tools import convert_module
from helpers import randomize_batchnorm, rel_err

import densetriton
from densetriton import DenseNetSpec, get_spec
from densetriton.reference import ReferenceDenseNet

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def densenet121_file(tmp_path_factory):
    """A torchvision densenet121 with non-trivial BatchNorms, and its converted weights file."""
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.densenet121(), seed=1)
    path = tmp_path_factory.mktemp("w") / "densenet121.safetensors"
    convert_module(model, path)
    return model, path


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_densenet121_matches_torchvision(densenet121_file, dtype, tol):
    model, path = densenet121_file
    engine = densetriton.load(path, device=DEVICE, dtype=dtype, backend="triton")
    assert engine.backend == "triton" and engine.dtype == dtype
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        expected_features = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(torch.relu(model.features(x)), 1), 1)
    logits = engine(x.to(DEVICE))
    assert logits.dtype == torch.float32 and logits.shape == (2, 1000)
    assert rel_err(logits, expected) < tol
    if dtype == torch.float32:  # the features path once: a second forward costs ~7 s in the interpreter
        assert rel_err(engine.features(x.to(DEVICE)), expected_features) < tol


def _random_model(spec, seed, size):
    torch.manual_seed(seed)
    return randomize_batchnorm(ReferenceDenseNet(spec), seed=seed + 1, image_size=size)


@pytest.mark.parametrize(
    "spec,size,batch",
    [
        (DenseNetSpec(4, (5,), 8, None, 1.0, 10, "cifar"), 9, 3),  # the paper's Figure 1, plain layers
        (DenseNetSpec(4, (5, 3), 8, None, 0.5, 7, "imagenet"), 37, 3),  # plain layers, ImageNet stem, odd size
        (get_spec("densenet_bc100_k12"), 32, 1),  # the paper's CIFAR DenseNet-BC (one image: 48 layers interpreted)
        (DenseNetSpec(6, (3, 2, 4), 10, 3, 0.7, 5, "imagenet"), 61, 3),  # odd widths, theta 0.7
    ],
    ids=["plain-k4-cifar", "plain-k4-imagenet", "cifar-bc100", "odd-spec"],
)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_specs_match_the_reference(spec, size, batch, dtype, tol):
    model = _random_model(spec, seed=5, size=size)
    engine = densetriton.load(spec, weights=None, device=DEVICE, dtype=dtype, backend="triton")
    engine_ref = densetriton.load(spec, weights=None, device="cpu", backend="reference")
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    engine = densetriton.Engine(
        densetriton.weights.Weights(spec, weights),
        device=engine.device,
        dtype=dtype,
        backend="triton",
        pretrained=False,
    )
    engine_ref._model.load_state_dict(weights, strict=False)
    x = torch.randn(batch, 3, size, size)
    assert rel_err(engine(x.to(DEVICE)), engine_ref(x)) < tol


@pytest.fixture(scope="module")
def tiny_engine():
    spec = DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, "imagenet")
    model = _random_model(spec, seed=9, size=40)
    weights = densetriton.weights.Weights(spec, {k: v for k, v in model.state_dict().items() if "num_batches" not in k})
    return model, densetriton.Engine(
        weights, device=torch.device(DEVICE), dtype=torch.float32, backend="triton", pretrained=False
    )


def test_forward_calls_no_cat(tiny_engine):
    _, engine = tiny_engine
    x = torch.randn(2, 3, 40, 40, device=DEVICE)
    engine(x)  # build the plan outside the profile
    with torch.profiler.profile() as prof:
        engine(x)
        engine.features(x)
    names = {e.name for e in prof.events()}
    assert "aten::cat" not in names
    # the profile does see aten ops: the returned logits are allocated, features cloned
    assert any(n.startswith("aten::") for n in names)


def test_a_call_allocates_only_its_result_and_the_stem_reads_the_callers_tensor(tiny_engine, monkeypatch):
    """With the kernels stubbed out (the interpreter allocates for itself), what is left is the
    executor's own work per call: one allocation, the returned logits, and no copy of the input
    (the v1 stem's: v2 packs the input into its workspace)."""
    import densetriton.kernels as kernels

    monkeypatch.setenv("DENSETRITON_KERNELS", "stem=v1")
    model, _ = tiny_engine
    launched = []
    for name in ("bn_relu_conv", "bn_relu_avgpool_conv", "max_pool_3x3_s2", "bn_relu_global_avgpool"):
        monkeypatch.setattr(
            kernels, name, lambda *args, _name=name, **kw: launched.append((_name, args[0] if args else None))
        )
    tensors = {k: v for k, v in model.state_dict().items() if "num_batches" not in k}
    engine = densetriton.Engine(
        densetriton.weights.Weights(model.spec, tensors),
        device=torch.device(DEVICE),
        dtype=torch.float32,
        backend="triton",
        pretrained=False,
    )
    x = torch.randn(2, 3, 40, 40, device=DEVICE)
    engine(x)  # builds (and on CUDA captures) the plan
    launched.clear()
    with torch.profiler.profile() as prof:
        logits = engine(x)
    allocations = [e.name for e in prof.events() if e.name.startswith(("aten::empty", "aten::zeros", "aten::clone"))]
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::contiguous", "aten::to", "aten::cat")]
    assert allocations == ["aten::empty"] and not copies, (allocations, copies)
    assert logits.shape == (2, 5)
    stem, stem_input = launched[0]
    assert stem == "bn_relu_conv" and stem_input.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "spec,size",
    [
        (DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, "imagenet"), 40),
        (DenseNetSpec(6, (3, 2, 4), 10, 3, 0.7, 5, "imagenet"), 45),
        (DenseNetSpec(4, (5,), 8, None, 1.0, 10, "cifar"), 9),
        (DenseNetSpec(3, (2, 2), 5, None, 0.5, 0, "cifar"), 12),
    ],
    ids=["bottleneck", "odd-widths", "plain-cifar", "plain-no-classifier"],
)
def test_no_stage_reads_a_buffer_element_nobody_wrote(spec, size):
    """Every plan buffer (arenas, bottleneck scratch, features) poisoned with NaN once the plan is
    built: a stage that read a stale or unwritten element would carry NaN into the result."""
    model = _random_model(spec, seed=11, size=size)
    tensors = {k: v for k, v in model.state_dict().items() if "num_batches" not in k}
    engine = densetriton.Engine(
        densetriton.weights.Weights(spec, tensors),
        device=torch.device(DEVICE),
        dtype=torch.float32,
        backend="triton",
        pretrained=False,
    )
    x = torch.randn(3, 3, size, size)
    plan = engine._model.plan(3, size, size)
    for buffer in (*plan.arenas, plan.features) + ((plan.scratch,) if plan.scratch is not None else ()):
        buffer.fill_(float("nan"))
    with torch.no_grad():
        expected = model.forward_features(x)
    features = engine.features(x.to(DEVICE))
    assert not features.isnan().any() and rel_err(features, expected) < 1e-4
    if spec.num_classes:
        for buffer in (*plan.arenas, plan.features) + ((plan.scratch,) if plan.scratch is not None else ()):
            buffer.fill_(float("nan"))
        with torch.no_grad():
            assert rel_err(engine(x.to(DEVICE)), model(x)) < 1e-4


def test_release_frees_every_plan_buffer():
    """After release() (and after a batch too large to plan) no plan buffer is reachable: nothing
    but the plan cache held them."""
    import gc
    import weakref

    spec = DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, "imagenet")
    engine = densetriton.load(spec, weights=None, device=DEVICE, backend="triton")
    x = torch.randn(2, 3, 40, 40, device=DEVICE)

    def buffers_of_the_plan():
        engine(x)
        engine.features(x)
        plan = engine._model.plan(2, 40, 40)
        return [weakref.ref(t) for t in (*plan.arenas, plan.features, plan.scratch)]

    refs = buffers_of_the_plan()
    engine.release()
    gc.collect()
    assert not any(r() is not None for r in refs)
    refs = buffers_of_the_plan()
    with pytest.raises(MemoryError):
        engine(torch.randn(1, 3, 40, 40, device=DEVICE).expand(10**11, 3, 40, 40))
    engine.release()
    gc.collect()
    assert not any(r() is not None for r in refs)
    assert engine(x).shape == (2, 5)


def test_plans_are_reused_and_results_never_alias(tiny_engine):
    model, engine = tiny_engine
    x1, x2 = torch.randn(2, 3, 40, 40, device=DEVICE), torch.randn(2, 3, 40, 40, device=DEVICE)
    a = engine(x1)
    a_copy = a.clone()
    f = engine.features(x1)
    executor = engine._model
    plan = executor.plan(2, 40, 40)
    arena_ptrs = [t.data_ptr() for t in plan.arenas]
    b = engine(x2)
    assert torch.equal(a, a_copy)  # a later call never changes an earlier result
    assert executor.plan(2, 40, 40) is plan and [t.data_ptr() for t in plan.arenas] == arena_ptrs
    owned = [*plan.arenas, plan.features, plan.scratch]
    for out in (a, b, f):
        assert all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in owned)
    with torch.no_grad():
        assert rel_err(b, model(x2.cpu())) < 1e-4
    # the plan's own byte count is what it allocated
    assert engine.planned_memory_bytes(2, 40, 40) == plan.nbytes + executor.weight_bytes


@pytest.mark.parametrize("stem", ["v1", "v2"])
def test_planned_bytes_are_what_a_plan_allocates(monkeypatch, stem):
    """The engine's memory estimate (the plan cache's bound, the out-of-memory message) counts the
    stem v2's packed input where block 1's arena cannot lend it, and only there."""
    from densetriton.plan import stem_v2_workspace

    monkeypatch.setenv("DENSETRITON_KERNELS", f"stem={stem}")
    cases = [(get_spec("densenet121"), 64), (DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, "imagenet"), 40)]
    cases += [(DenseNetSpec(4, (5,), 8, None, 1.0, 10, "cifar"), 9)]
    lent = set()
    for spec, size in cases:
        engine = densetriton.load(spec, weights=None, device=DEVICE, dtype=torch.float16, backend="triton")
        executor = engine._model
        assert executor.kernel_choice.of("stem") == stem
        plan = executor.plan(2, size, size)
        assert executor.planned_bytes(2, size, size) == plan.nbytes
        lent.add(stem_v2_workspace(spec, executor.stages[0], 2, size, size)[1])
    assert lent == {True, False}  # both ways of holding the packed input were counted


def test_channels_last_and_noncontiguous_inputs(tiny_engine):
    model, engine = tiny_engine
    base = torch.randn(3, 3, 50, 44, device=DEVICE)
    views = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "cropped": base[:, :, 3:43, 2:42],
        "float16 input": base.half(),
    }
    for what, x in views.items():
        with torch.no_grad():
            expected = model(x.float().cpu().contiguous())
        assert rel_err(engine(x), expected) < (1e-3 if x.dtype == torch.float16 else 1e-4), what


def test_plan_cache_stays_within_its_bound(tiny_engine):
    _, engine = tiny_engine
    executor = engine._model
    one = executor.planned_bytes(2, 40, 40)
    executor.plan_cache_bytes = int(2.5 * one)
    for size in (40, 41, 44, 48, 40):
        engine(torch.randn(2, 3, size, size, device=DEVICE))
        assert sum(p.nbytes for p in executor.plans.values()) <= executor.plan_cache_bytes
    assert len(executor.plans) == 2
    executor.plan_cache_bytes = one // 2  # below one plan: the newest is kept alone, the call needs it
    engine(torch.randn(2, 3, 44, 44, device=DEVICE))
    assert [key[:3] for key in executor.plans] == [(2, 44, 44)]
    engine.release()
    assert not executor.plans
    assert engine(torch.randn(1, 3, 40, 40, device=DEVICE)).shape == (1, 5)


def test_input_too_small_and_empty_batch(tiny_engine):
    _, engine = tiny_engine
    smallest = engine.spec.min_input_size()
    with pytest.raises(ValueError, match=f"{smallest}x{smallest}"):
        engine(torch.randn(1, 3, smallest - 1, smallest - 1, device=DEVICE))
    engine(torch.randn(1, 3, smallest, smallest, device=DEVICE))
    assert engine(torch.randn(0, 3, 40, 40, device=DEVICE)).shape == (0, 5)


@pytest.mark.parametrize(
    "interpret,before,dtype,error,match",
    [
        (None, "", "float32", "RuntimeError", "TRITON_INTERPRET=1"),
        # Set too late: triton's own jit functions, or ours, were already compiled-mode.
        ("after", "import triton\n", "float32", "RuntimeError", "TRITON_INTERPRET=1"),
        ("after", "import densetriton.kernels\n", "float32", "RuntimeError", "TRITON_INTERPRET=1"),
        # Triton's library interpreted but our kernels decorated while the variable was unset.
        (
            "after",
            "os.environ['TRITON_INTERPRET'] = '1'\nimport triton\ndel os.environ['TRITON_INTERPRET']\n"
            "import densetriton.kernels\n",
            "float32",
            "RuntimeError",
            "TRITON_INTERPRET=1",
        ),
        # The interpreter's tl.dot on bfloat16 gives garbage: refused, not run.
        ("before", "", "bfloat16", "ValueError", "bfloat16 does not run correctly under Triton's interpreter"),
    ],
    ids=["unset", "set-after-triton", "set-after-kernels", "kernels-compiled-mode", "bfloat16"],
)
def test_cpu_triton_without_a_working_interpreter_is_one_clear_error(interpret, before, dtype, error, match):
    code = (
        "import os\n"
        + before
        + ("os.environ['TRITON_INTERPRET'] = '1'\n" if interpret == "after" else "")
        + "import densetriton, torch\n"
        "from densetriton import DenseNetSpec\n"
        "try:\n"
        f"    e = densetriton.load(DenseNetSpec(4, (2,), 8, 2, 0.5, 3, 'cifar'), weights=None, device='cpu', backend='triton', dtype='{dtype}')\n"
        "    print('LOADED', e(torch.randn(1, 3, 8, 8)).shape)\n"
        f"except {error} as e:\n"
        "    print('ERROR:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret == "before":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "ERROR:" in out.stdout and match in out.stdout, out.stdout + out.stderr


def test_cpu_triton_with_the_interpreter_set_before_python_starts_runs():
    """The check above refuses only what is broken: set before the imports, the kernels run."""
    code = (
        "import densetriton, torch\n"
        "from densetriton import DenseNetSpec\n"
        "e = densetriton.load(DenseNetSpec(4, (2,), 8, 2, 0.5, 3, 'cifar'), weights=None, device='cpu', backend='triton')\n"
        "r = densetriton.load(DenseNetSpec(4, (2,), 8, 2, 0.5, 3, 'cifar'), weights=None, device='cpu', backend='reference')\n"
        "r._model.load_state_dict(e.weights.tensors, strict=False)\n"
        "x = torch.randn(1, 3, 8, 8)\n"
        "print('ERR', ((e(x) - r(x)).norm() / r(x).norm()).item())\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    from densetriton.executor import _triton_version

    if _triton_version() < (3, 8):  # the GPU host's triton 3.6: its interpreter fails these kernels
        assert "needs Triton's interpreter from triton 3.8 on" in out.stderr, out.stdout + out.stderr
        return
    assert "ERR" in out.stdout, out.stdout + out.stderr
    assert float(out.stdout.split("ERR")[1]) < 1e-5, out.stdout


def test_an_older_tritons_interpreter_is_one_clear_error(monkeypatch):
    """triton 3.6's interpreter fails these kernels (seen on the GPU host with numpy 2.5): refused
    with a message saying what to do, before anything runs."""
    import densetriton.executor as executor

    monkeypatch.setattr(executor, "_triton_version_text", lambda: "3.6.0")
    monkeypatch.setattr(executor, "_interpreter_ready", lambda kernels: True)  # as on a CPU machine
    assert executor._triton_version() == (3, 6)
    with pytest.raises(RuntimeError, match=r"from triton 3.8 on \(triton 3.6.0's fails.*backend='reference'"):
        densetriton.load(DenseNetSpec(4, (2,), 8, 2, 0.5, 3, "cifar"), weights=None, device="cpu", backend="triton")
    monkeypatch.setattr(executor, "_triton_version_text", lambda: "3.8.0+git1234")
    assert executor._triton_version() == (3, 8)


class _StandInGraph:
    """What a CUDA graph of the plan replays, run eagerly: CUDA graphs need a GPU."""

    def __init__(self, plan):
        self.launches = plan.graph_launches()

    def replay(self):
        for launch in self.launches:
            launch(None, None)


@pytest.mark.parametrize(
    "stem,num_classes,first",
    [
        ("imagenet", 5, "features"),
        ("imagenet", 5, "logits"),
        ("cifar", 5, "features"),
        ("imagenet", 0, "features"),
        ("cifar", 0, "features"),
    ],
    ids=[
        "imagenet-features-first",
        "imagenet-logits-first",
        "cifar-features-first",
        "imagenet-backbone",
        "cifar-backbone",
    ],
)
def test_a_replayed_graph_runs_every_launch_exactly_once_for_logits_and_features(stem, num_classes, first, monkeypatch):
    """The graph holds every launch but the stem and the classifier, so features calls (the only
    calls a backbone gets) capture and replay it too, and logits and features calls replay the
    same graph, whichever captured it. On the CPU a stand-in replays the captured launches; every
    launch is counted, and each call's buffers are poisoned with NaN first."""
    spec = DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, stem)
    size = 40 if stem == "imagenet" else 12
    model = _random_model(spec, seed=21, size=size)
    tensors = {
        k: v
        for k, v in model.state_dict().items()
        if "num_batches" not in k and (num_classes or not k.startswith("classifier."))
    }
    engine = densetriton.Engine(
        densetriton.weights.Weights(spec.replace(num_classes=num_classes), tensors),
        device=torch.device(DEVICE),
        dtype=torch.float32,
        backend="triton",
        pretrained=False,
    )
    captures = []

    def capture(plan, x, logits, stream):
        plan.run(x, logits)
        plan.graph = _StandInGraph(plan)
        captures.append((plan.key, "logits" if logits is not None else "features"))

    monkeypatch.setattr(densetriton.plan.Plan, "capture", capture)
    executor = engine._model
    executor.use_cuda_graphs, executor.capture_stream = True, "stream"
    plan = executor.plan(3, size, size)
    counts = [0] * len(plan.launches)

    def counted(i, launch):
        def run(x, logits):
            counts[i] += 1
            launch(x, logits)

        return run

    plan.launches = [(stage, counted(i, launch)) for i, (stage, launch) in enumerate(plan.launches)]
    ops = [stage.op for stage, _ in plan.launches]
    assert len(plan.graph_launches()) == len(ops) - 1 - (num_classes > 0)
    assert ops[0] == "conv" and ops[-1] == ("classifier" if num_classes else "head")
    calls = ["features", "logits"] * 2 if num_classes else ["features"] * 3
    if first == "logits":
        calls = calls[1:] + calls[:1]
    for call in calls:
        x = torch.randn(3, 3, size, size, device=DEVICE)
        for t in [*plan.arenas, plan.features] + ([plan.scratch] if plan.scratch is not None else []):
            t.fill_(float("nan"))
        counts[:] = [0] * len(counts)
        with torch.no_grad():
            if call == "features":
                assert rel_err(engine.features(x), model.forward_features(x.cpu())) < 1e-4
            else:
                assert rel_err(engine(x), model(x.cpu())) < 1e-4
        classifier = num_classes and call == "logits"
        assert counts == [1] * (len(ops) - 1) + [1 if classifier or not num_classes else 0], (call, counts)
    assert captures == [((3, size, size), first)] and plan.graph is not None


# -- on the GPU -----------------------------------------------------------------------------

GPU_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _graphed_and_eager(spec, seed, monkeypatch):
    """Two float16 Triton engines on the same random weights: CUDA graphs on, and off."""
    model = _random_model(spec, seed=seed, size=64).cuda()
    weights = densetriton.weights.Weights(spec, {k: v for k, v in model.state_dict().items() if "num_batches" not in k})
    device = torch.device("cuda", torch.cuda.current_device())
    graphed = densetriton.Engine(weights, device=device, dtype=torch.float16, backend="triton", pretrained=False)
    monkeypatch.setenv("DENSETRITON_CUDA_GRAPHS", "0")
    eager = densetriton.Engine(weights, device=device, dtype=torch.float16, backend="triton", pretrained=False)
    return graphed, eager


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_kernel_by_kernel_launches(monkeypatch):
    graphed, eager = _graphed_and_eager(get_spec("densenet121"), 13, monkeypatch)
    assert graphed._model.use_cuda_graphs and not eager._model.use_cuda_graphs
    for batch in (1, 8, 8, 1):  # a replayed graph must read each call's new input
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        assert torch.equal(graphed(x), eager(x))
        assert torch.equal(graphed.features(x), eager.features(x))
    plans = list(graphed._model.plans.values())
    assert plans and all(p.graph is not None for p in plans)
    assert (
        graphed.planned_memory_bytes(8, 224, 224)
        == graphed._model.plan(8, 224, 224).nbytes + graphed._model.weight_bytes
    )
    # A features call captures too (embedding workloads may never ask for logits), and a
    # backbone without a classifier, which gets only features calls, is graphed.
    x = torch.randn(4, 3, 224, 224, device="cuda")
    assert torch.equal(graphed.features(x), eager.features(x))
    assert graphed._model.plan(4, 224, 224).graph is not None
    assert torch.equal(graphed(x), eager(x))
    monkeypatch.delenv("DENSETRITON_CUDA_GRAPHS")  # set to 0 for the eager engine above
    backbone = graphed.weights.spec.replace(num_classes=0)
    tensors = {k: v for k, v in graphed.weights.tensors.items() if not k.startswith("classifier.")}
    engine = densetriton.Engine(
        densetriton.weights.Weights(backbone, tensors),
        device=graphed.device,
        dtype=torch.float16,
        backend="triton",
        pretrained=False,
    )
    for batch in (2, 2):
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        assert torch.equal(engine.features(x), eager.features(x))
    assert engine._model.plan(2, 224, 224).graph is not None
    engine.warmup([5])  # builds, compiles and captures: the next call only replays
    assert engine._model.plan(5, 224, 224).graph is not None


@pytest.mark.gpu
def test_gpu_a_failed_capture_falls_back_and_leaves_cuda_usable(monkeypatch):
    """A capture that CUDA invalidates (here: a synchronize while capturing) leaves torch's
    allocator routing into the graph's pool and the capture stream current unless the plan closes
    both: the engine must warn, answer right, and leave empty_cache() and later captures working."""
    engine, eager = _graphed_and_eager(DenseNetSpec(8, (2, 2), 16, 2, 0.5, 5, "imagenet"), 17, monkeypatch)
    plan = engine._model.plan(2, 64, 64)
    stage, launch = plan.launches[2]

    def synchronize_while_capturing(x_, logits):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()  # not permitted during a capture: invalidates it
        launch(x_, logits)

    plan.launches[2] = (stage, synchronize_while_capturing)
    caller = torch.cuda.current_stream()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        out = engine(x)
    assert plan.graph is None and plan.graph_failed
    assert torch.cuda.current_stream() == caller
    assert torch.equal(out, eager(x))
    torch.cuda.empty_cache()  # fails an allocator assert while a capture is left open
    y = torch.randn(3, 3, 64, 64, device="cuda")
    assert torch.equal(engine(y), eager(y))
    assert engine._model.plan(3, 64, 64).graph is not None  # the next shape captures as usual
    engine.release()


@pytest.mark.gpu
@pytest.mark.parametrize("name", densetriton.list_models())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_gpu_registry_models_at_224(name, dtype, monkeypatch):
    spec = get_spec(name)
    size = 224  # the CIFAR models too (their stem keeps 224x224 through block 1: up to 24 GiB of buffers at batch 64)
    model = _random_model(spec, seed=11, size=64 if spec.stem == "imagenet" else 32).cuda()
    weights = densetriton.weights.Weights(spec, {k: v for k, v in model.state_dict().items() if "num_batches" not in k})
    engine = densetriton.Engine(
        weights,
        device=torch.device("cuda", torch.cuda.current_device()),
        dtype=dtype,
        backend="triton",
        pretrained=False,
    )
    # A float32 reference, not TF32 (monkeypatch restores the global flags afterwards).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for batch in (1, 64):
        x = torch.randn(batch, 3, size, size, device="cuda")
        with torch.no_grad():
            # 8 images at a time: the reference's torch.cat of every layer at 224x224 leaves the
            # caching allocator a block of each size (a 100-layer CIFAR net at batch 64 ran the
            # H200's 140 GiB out that way), and emptied after each model.
            expected = torch.cat([model(chunk) for chunk in x.split(8)])
        torch.cuda.empty_cache()
        out = engine(x)
        torch.cuda.synchronize()
        assert rel_err(out, expected) < GPU_TOL[dtype], (name, batch, dtype)
        del expected, out
    engine.release()  # the next model's reference needs the memory back
    del model
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_backbone_without_classifier_gives_the_same_features_and_no_logits(tiny_engine, backend):
    """num_classes 0 (a backbone saved without its classifier): the plan ends at the features,
    which equal the full model's; asking for logits is one clear error, and the engine still works."""
    model, _ = tiny_engine
    spec = model.spec.replace(num_classes=0)
    assert "classifier.weight" not in spec.state_dict_shapes()
    tensors = {
        k: v for k, v in model.state_dict().items() if "num_batches" not in k and not k.startswith("classifier.")
    }
    device = torch.device(DEVICE if backend == "triton" else "cpu")
    engine = densetriton.Engine(
        densetriton.weights.Weights(spec, tensors),
        device=device,
        dtype=torch.float32,
        backend=backend,
        pretrained=False,
    )
    if backend == "triton":
        plan = engine._model.plan(3, 40, 40)
        assert [stage.op for stage, _ in plan.launches][-1] == "head"
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        expected = model.forward_features(x)
    with pytest.raises(ValueError, match="no classifier .* engine.features"):
        engine(x.to(device))
    features = engine.features(x.to(device))
    assert features.shape == (3, spec.num_features) and rel_err(features, expected) < 1e-4
