"""Kernel variants (DENSETRITON_KERNELS), the tile tables, tuned tables, and a sweep's candidate check."""

import json
import sys

import pytest
import torch
from helpers import randomize_batchnorm, rel_err

import densetriton
from densetriton import DenseNetSpec, kernels
from densetriton.plan import Plan, build_stages, fold_batchnorm, stage_op
from densetriton.reference import ReferenceDenseNet
from densetriton.tiles import (
    LayerKey,
    choose_tiles,
    find_tuned_table,
    heuristic_tiles,
    load_tuned_table,
    tuned_table_json,
    tuned_table_name,
)
from densetriton.tuning import build_candidate, check_candidate
from densetriton.variants import OP_VARIANTS, KernelChoice, parse_kernel_choice

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# -- DENSETRITON_KERNELS ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        (None, {"stem": "v2"}),
        ("", {"stem": "v2"}),
        ("v1", {}),
        ("v2", {"conv1x1": "v2", "conv3x3": "v2", "stem": "v2", "classifier": "v2"}),
        (" conv1x1 = v2 ", {"conv1x1": "v2", "stem": "v2"}),
        ("v2,conv3x3=v1", {"conv1x1": "v2", "stem": "v2", "classifier": "v2"}),
        ("conv3x3=v2,stem=v1", {"conv3x3": "v2"}),
        ("v1,stem=v2", {"stem": "v2"}),
        ("v2-pdl", {"conv1x1": "v2-pdl", "conv3x3": "v2-pdl", "stem": "v2"}),
        ("v2,conv1x1=v2-pdl", {"conv1x1": "v2-pdl", "conv3x3": "v2", "stem": "v2", "classifier": "v2"}),
    ],
)
def test_kernel_choice_syntax(text, expected):
    """`expected`: the ops that run another variant than v1."""
    choice = parse_kernel_choice(text)
    assert {op: choice.of(op) for op in OP_VARIANTS} == {op: expected.get(op, "v1") for op in OP_VARIANTS}


@pytest.mark.parametrize(
    "text,match",
    [
        ("v3", "no op has a variant 'v3'"),
        ("v1,v2", "more than one variant for all ops"),
        ("transition=v2", "transition has no variant 'v2'"),
        ("conv5x5=v1", "unknown op"),
        ("conv1x1=v2,conv1x1=v1", "named twice"),
        ("conv1x1", "no op has a variant 'conv1x1'"),
    ],
)
def test_a_bad_kernel_choice_is_one_error_naming_what_exists(text, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_kernel_choice(text)
    assert "DENSETRITON_KERNELS" in str(e.value) and "conv1x1: v1/v2" in str(e.value)


def test_an_engine_refuses_an_unknown_variant_at_load(monkeypatch):
    monkeypatch.setenv("DENSETRITON_KERNELS", "conv1x1=v9")
    with pytest.raises(ValueError, match="conv1x1 has no variant 'v9'"):
        densetriton.load(
            DenseNetSpec(4, (2,), 8, 2, 0.5, 3, "imagenet"),
            weights=None,
            device=DEVICE,
            dtype=torch.float32,
            backend="triton",
        )


# -- whole networks under v2 --------------------------------------------------------------------


def _engines(spec, size, dtype, monkeypatch, names=("v1", "v2")):
    """The same random weights under each DENSETRITON_KERNELS of `names`, and the float32 reference model."""
    torch.manual_seed(3)
    model = randomize_batchnorm(ReferenceDenseNet(spec), seed=4, image_size=size)
    weights = densetriton.weights.Weights(spec, {k: v for k, v in model.state_dict().items() if "num_batches" not in k})
    engines = {}
    for name in names:
        monkeypatch.setenv("DENSETRITON_KERNELS", name)
        engines[name] = densetriton.Engine(
            weights, device=torch.device(DEVICE), dtype=dtype, backend="triton", pretrained=False
        )
    monkeypatch.setenv("DENSETRITON_KERNELS", "v1")  # read at creation: the v2 engine keeps v2
    return model.eval(), engines


def _spy_on_v2(monkeypatch):
    calls = []
    real = kernels.bn_relu_conv_v2

    def spy(*args, **kwargs):
        calls.append(kwargs["kernel_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "bn_relu_conv_v2", spy)
    return calls


@pytest.mark.parametrize(
    "spec,size,dtype,tol",
    [
        (DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, "imagenet"), 37, torch.float16, 1e-2),  # BC: 1x1 + 3x3, odd size
        (DenseNetSpec(4, (3,), 8, None, 1.0, 7, "cifar"), 9, torch.float32, 1e-4),  # plain: 3x3 with prologue
    ],
    ids=["bc-imagenet-fp16", "plain-cifar-fp32"],
)
def test_v2_engine_matches_v1_and_the_reference(spec, size, dtype, tol, monkeypatch):
    """Fails if the engine ignores DENSETRITON_KERNELS (no v2 call), or if v2 changes results."""
    model, engines = _engines(spec, size, dtype, monkeypatch)
    calls = _spy_on_v2(monkeypatch)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    v2 = engines["v2"](x.to(DEVICE))
    assert set(calls) == ({1, 3} if spec.bn_size else {3}), "the v2 engine did not run the v2 kernels"
    # Every dense conv at least once (on CUDA the graph capture launches them a second time).
    v2_calls = len(calls)
    assert v2_calls >= sum(1 for s in build_stages(spec) if stage_op(s) in ("conv1x1", "conv3x3"))
    v1 = engines["v1"](x.to(DEVICE))
    assert len(calls) == v2_calls, "the v1 engine ran v2 kernels"
    assert rel_err(v2, expected) < tol and rel_err(v2, v1) < tol
    assert torch.equal(engines["v2"](x.to(DEVICE)), v2), "two v2 calls differ"


def test_a_nan_pixel_gives_nan_logits_under_v2(monkeypatch):
    spec = DenseNetSpec(4, (2, 2), 8, 2, 0.5, 5, "imagenet")
    _, engines = _engines(spec, 32, torch.float32, monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    x[1, 0, 5, 7] = float("nan")
    logits = engines["v2"](x.to(DEVICE)).cpu()
    assert torch.isfinite(logits[0]).all() and torch.isnan(logits[1]).all()


def test_v2_pdl_runs_the_v2_kernels_with_programmatic_dependent_launch_and_the_same_bits(monkeypatch):
    """v2-pdl binds pdl=True into every dense conv (the GPU launches them so; the interpreter runs
    them as v2): its engine gives v2's results bit for bit, batch 1's split launches included."""
    spec = DenseNetSpec(4, (2, 3), 8, 2, 0.5, 5, "imagenet")
    v2, v2_pdl = "conv1x1=v2,conv3x3=v2", "conv1x1=v2-pdl,conv3x3=v2-pdl"
    _, engines = _engines(spec, 37, torch.float16, monkeypatch, names=(v2, v2_pdl))
    pdl = []
    real = kernels.bn_relu_conv_v2

    def spy(*args, **kwargs):
        pdl.append(kwargs.get("pdl", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "bn_relu_conv_v2", spy)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 37, 37).to(DEVICE)
        before = len(pdl)
        with_pdl = engines[v2_pdl](x)  # on a GPU: the eager run inside the graph's capture
        assert pdl[before:] and all(pdl[before:]), "the v2-pdl engine launched without pdl"
        before = len(pdl)
        assert torch.equal(with_pdl, engines[v2](x))
        assert not any(pdl[before:]), "the v2 engine launched with pdl"
        if DEVICE == "cuda":  # the graph, replayed, on other inputs: PDL's edges inside a CUDA graph
            plan = engines[v2_pdl]._model.plan(batch, 37, 37)
            assert plan.graph is not None and not plan.graph_failed, "the v2-pdl plan was not captured"
            for _ in range(3):
                x = torch.randn(batch, 3, 37, 37, device=DEVICE)
                assert torch.equal(engines[v2_pdl](x), engines[v2](x))
    flags = sys.modules["densetriton.kernels.bn_relu_conv_v2"]._pdl_flags(True, torch.device(DEVICE))
    # The interpreter and GPUs before sm_90 have no griddepcontrol: there pdl is off.
    hopper = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    assert flags == ({"PDL": True, "launch_pdl": True} if hopper else {"PDL": False})


# -- tile tables ----------------------------------------------------------------------------------


def _key(op="conv1x1", variant="v1", dtype="float16", batch=256, hw=56, c_in=128, c_out=128, k=1):
    return LayerKey(op, variant, dtype, batch, hw, hw, c_in, c_out, k)


def test_heuristic_tables_give_the_sizes_ptxas_was_read_for():
    # densenet121 at batch 256: 128x128x64 at 8 warps for the 1x1 (a 128x128 float32
    # accumulator at 4 warps spilled); the stem at most 64 columns, K = 32, 8 warps; 16-row classifier.
    assert heuristic_tiles(_key(), interpreted=False) == dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8)
    assert heuristic_tiles(_key(op="stem", hw=112, c_in=3, c_out=64, k=7), interpreted=False) == dict(
        BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8
    )
    assert heuristic_tiles(
        _key(op="classifier", dtype="float32", hw=1, c_in=1024, c_out=1000), interpreted=False
    ) == dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=16, num_warps=4)
    # 64x128 in 16-bit stays at 4 warps; float32 K steps of 16 and 8 warps from 64x64.
    assert heuristic_tiles(_key(batch=1, hw=7), interpreted=False)["num_warps"] == 4
    assert heuristic_tiles(_key(dtype="float32", batch=1, hw=7), interpreted=False) == dict(
        BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, num_warps=8
    )
    assert heuristic_tiles(_key(op="head", batch=2, hw=7, c_out=1024), interpreted=False) == dict(
        BLOCK_C=128, BLOCK_HW=64
    )


def _table(tmp_path, entries, name="nvidia-h100-80gb-hbm3-triton3.6.json"):
    path = tmp_path / name
    path.write_text(tuned_table_json("NVIDIA H100 80GB HBM3", "3.6.0", entries))
    return path


def test_a_tuned_entry_wins_for_its_exact_layer_only(tmp_path):
    tuned_tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4)
    table = load_tuned_table(_table(tmp_path, {_key(variant="v2"): tuned_tiles}))
    assert choose_tiles(_key(variant="v2"), interpreted=False, tuned=table) == tuned_tiles
    for other in (_key(), _key(variant="v2", batch=64), _key(variant="v2", dtype="bfloat16")):
        assert choose_tiles(other, interpreted=False, tuned=table) == heuristic_tiles(other, interpreted=False)
    # The interpreter keeps its own (largest) tiles.
    assert choose_tiles(_key(variant="v2"), interpreted=True, tuned=table) == heuristic_tiles(_key(), interpreted=True)


def test_the_tuned_table_is_found_by_gpu_and_triton_user_cache_first(tmp_path):
    assert tuned_table_name("NVIDIA H100 80GB HBM3", "3.6.0+git1a2b") == "nvidia-h100-80gb-hbm3-triton3.6.json"
    user, package = tmp_path / "user", tmp_path / "package"
    user.mkdir(), package.mkdir()
    _table(package, {_key(): dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=2, num_stages=2)})
    assert find_tuned_table("NVIDIA H100 80GB HBM3", "3.6.1", [user, package]).path.parent == package
    _table(user, {})
    assert find_tuned_table("NVIDIA H100 80GB HBM3", "3.6.1", [user, package]).path.parent == user
    assert find_tuned_table("NVIDIA H200", "3.6.1", [user, package]) is None
    assert find_tuned_table("NVIDIA H100 80GB HBM3", "3.8.0", [user, package]) is None


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda d: d.update(format="other"), "not a densetriton-tuned-tiles version 1 file"),
        (lambda d: d["entries"][0].pop("c_in"), "entry 0: missing c_in"),
        (lambda d: d["entries"][0].update(BLOCK_K=24), "BLOCK_K must be a power of two >= 16"),
        (lambda d: d["entries"][0].update(num_warps=True), "num_warps must be a power of two"),
        (
            lambda d: d["entries"][0].update(split_k=2),
            "split_k 2: only conv1x1 v2, conv1x1 v2-pdl, conv3x3 v2, conv3x3 v2-pdl split K",
        ),
        (lambda d: d["entries"][0].update(split_k=0), "split_k must be an int from 1 to 64"),
        (lambda d: d["entries"][0].update(op="max_pool"), "op must be one of"),
        (lambda d: d["entries"][0].update(colour="blue"), "unknown field"),
        (lambda d: d["entries"].append(dict(d["entries"][0])), "entry 1: a second entry for the same layer"),
    ],
)
def test_a_malformed_tuned_table_is_one_error_naming_file_and_entry(tmp_path, change, match):
    path = _table(tmp_path, {_key(): dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=2, num_stages=2)})
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match) as e:
        load_tuned_table(path)
    assert str(path) in str(e.value)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        load_tuned_table(path)


def test_the_plan_launches_with_the_tuned_tiles(tmp_path, monkeypatch):
    """A GPU plan (built on CPU tensors; kernels stubbed) takes the tuned entry for the one layer it
    names and the heuristics for the others."""
    spec = DenseNetSpec(4, (2,), 8, 2, 0.5, 3, "imagenet")
    seen = []
    monkeypatch.setattr(kernels, "bn_relu_conv_v2", lambda *a, **kw: seen.append(kw))
    first_1x1 = LayerKey("conv1x1", "v2", "float16", 4, 8, 8, 8, 8, 1)  # 32x32 input: 8x8 after the stem
    tuned = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=2, num_stages=5)
    table = load_tuned_table(_table(tmp_path, {first_1x1: tuned}))
    folded = fold_batchnorm(ReferenceDenseNet(spec).state_dict(), spec, torch.float16, "cpu")
    plan = Plan(
        spec,
        build_stages(spec),
        folded,
        n=4,
        height=32,
        width=32,
        dtype=torch.float16,
        device=torch.device("cpu"),
        interpreted=False,
        kernel_choice=parse_kernel_choice("v2"),
        tuned=table,
    )
    for stage, launch in plan.launches:
        if stage_op(stage) in ("conv1x1", "conv3x3"):
            launch(None, None)
    tiles = [{k: v for k, v in kw.items() if k.startswith(("BLOCK", "num_"))} for kw in seen]
    assert [kw["kernel_size"] for kw in seen] == [1, 3, 1, 3]
    assert tiles[0] == tuned
    assert tiles[2] == heuristic_tiles(LayerKey("conv1x1", "v2", "float16", 4, 8, 8, 12, 8, 1), interpreted=False)


def test_default_plans_run_the_stem_v2_and_v1_elsewhere():
    """The stem's v2 was timed faster on an H100 (bench/NOTES.md); every other op keeps v1."""
    choice = KernelChoice()
    assert {op: choice.of(op) for op in OP_VARIANTS} == {op: "v2" if op == "stem" else "v1" for op in OP_VARIANTS}
    assert choice == parse_kernel_choice(None) and choice.describe() == "default"
    assert parse_kernel_choice("v2,conv3x3=v1").describe() == "classifier=v2,conv1x1=v2"
    assert parse_kernel_choice("v1").describe() == "stem=v1"


# -- a sweep's candidate check --------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        LayerKey("conv3x3", "v2", "float16", 2, 5, 7, 37, 12, 3),
        LayerKey("conv1x1", "v2", "float32", 2, 5, 3, 40, 24, 1),
        LayerKey("transition", "v1", "float16", 2, 3, 3, 40, 20, 1),
        LayerKey("stem", "v1", "float16", 1, 6, 5, 1, 16, 7),
    ],
)
def test_check_candidate_accepts_other_tiles_and_catches_a_wrong_kernel(key, monkeypatch):
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=2)
    assert check_candidate(key, tiles, device=DEVICE) < 1e-2
    out = build_candidate(key, tiles, device=DEVICE)()
    assert out.shape == (key.batch, key.height, key.width, key.c_out) and not torch.isnan(out).any()
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        build_candidate(key, dict(tiles, BLOCK_N=24), device=DEVICE)()
    if key.variant == "v2":  # a candidate kernel that skips the last input channel is caught
        real = kernels.bn_relu_conv_v2

        def wrong(x, weight, out, **kw):
            taps = kw["kernel_size"] ** 2
            kept = weight.view(taps, x.shape[3], weight.shape[1])[:, :-1].reshape(-1, weight.shape[1])
            scale_shift = {k: kw[k][:-1] for k in ("in_scale", "in_shift") if kw.get(k) is not None}
            return real(x[..., :-1], pack_like(kept, weight.dtype), out, **{**kw, **scale_shift})

        monkeypatch.setattr(kernels, "bn_relu_conv_v2", wrong)
        assert check_candidate(key, tiles, device=DEVICE) > 1e-2


def pack_like(rows: torch.Tensor, dtype) -> torch.Tensor:
    """[K, Cout] rows as a unit-column-stride operand (what pack_conv_weight returns)."""
    return rows.to(dtype).contiguous()


# -- split-K --------------------------------------------------------------------------------------


def test_split_k_fills_a_wave_only_where_a_launch_leaves_the_gpu_idle():
    """Batch 1's block 4 (7x7): the 1x1 at 1920 channels is one program over 30 K steps, split 4 ways
    (8 would leave 3 steps a split); its 3x3 (18 steps) too. Batch 256, v1, the interpreter: none."""
    late_1x1 = _key(variant="v2", batch=1, hw=7, c_in=1920, c_out=128)
    assert heuristic_tiles(late_1x1, interpreted=False)["SPLIT_K"] == 4
    late_3x3 = _key(op="conv3x3", variant="v2", batch=1, hw=7, c_in=128, c_out=32, k=3)
    assert heuristic_tiles(late_3x3, interpreted=False)["SPLIT_K"] == 4
    for key in (_key(variant="v2"), _key(batch=1, hw=7, c_in=1920), _key(variant="v2", batch=1, hw=7, c_in=32)):
        assert "SPLIT_K" not in heuristic_tiles(key, interpreted=False), key
    assert "SPLIT_K" not in heuristic_tiles(late_1x1, interpreted=True)


def test_a_tuned_split_k_is_written_read_and_launched(tmp_path):
    key = _key(variant="v2", batch=1, hw=7, c_in=1920, c_out=128)
    tiles = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3, SPLIT_K=8)
    table = load_tuned_table(_table(tmp_path, {key: tiles}))
    assert table.get(key) == tiles and choose_tiles(key, interpreted=False, tuned=table) == tiles
    assert json.loads(tuned_table_json("g", "3.6", {key: tiles}))["entries"][0]["split_k"] == 8


def test_a_whole_network_with_split_k_launches_matches_the_reference(monkeypatch):
    """Every dense-layer conv split (2 ways for the 1x1s, 3 for the 3x3s) in the interpreter: the
    reference's logits; the plan's one workspace is what its largest split asks for, and the
    engine's planned bytes count it."""
    import densetriton.plan

    real = densetriton.plan.choose_tiles

    def splitting(key, **kw):
        tiles = real(key, **kw)
        if key.op in ("conv1x1", "conv3x3"):
            tiles = {**tiles, "SPLIT_K": 2 if key.op == "conv1x1" else 3}
        return tiles

    monkeypatch.setattr(densetriton.plan, "choose_tiles", splitting)
    monkeypatch.setenv("DENSETRITON_KERNELS", "v2")
    spec = DenseNetSpec(8, (2, 2), 16, 2, 0.5, 5, "imagenet")
    model, engines = _engines(spec, 36, torch.float32, monkeypatch)
    engine = engines["v2"]
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        assert rel_err(engine(x.to(DEVICE)), model(x)) < 1e-4
    plan, executor = engine._model.plan(2, 36, 36), engine._model
    widest = max(s.writes.stop - s.writes.start for s in executor.stages if stage_op(s) == "conv1x1")
    assert plan.split_k_workspace.numel() == 2 * 2 * 9 * 9 * widest  # block 1 (9x9) is the largest
    assert executor.planned_bytes(2, 36, 36) == plan.nbytes
