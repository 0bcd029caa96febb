"""From a spec to kernel launches: the stage graph, folded weights, buffers, the launch list.

Three steps, each cached at its own level:

1. `build_stages(spec)` -- the network as a list of stages (one kernel launch each), naming the
   folded weights it uses and the buffer slices it reads and writes. Depends on the spec only.
2. `fold_batchnorm(tensors, spec, dtype, device)` -- BatchNorms turned into per-channel
   scale/shift (applied as a kernel prologue) or folded into the following conv's weights
   plus a bias; conv weights packed as [KH*KW*Cin, Cout] GEMM operands. Once per engine.
3. `Plan(spec, stages, folded, n=, height=, width=, ...)` -- for one (N, H, W): the preallocated buffers and every launch bound to its
   views, its kernel variant (densetriton.variants) and its tiles (densetriton.tiles). A call
   only launches.

Buffers (NHWC). Each dense block owns a concatenation buffer [N, H, W, C0 + L*k]: layer l
reads the channel prefix [0, C0 + l*k) and writes its k channels at [C0 + l*k, C0 + (l+1)*k).
Nothing is concatenated or copied. Block buffers live in two arenas used alternately (block b
is dead once transition b has read it, so block b+2 may take its memory); the ImageNet stem's
conv output lives in the second arena before block 2 needs it. All bottleneck layers share one
`bottleneck_scratch` for their bn_size*k intermediate channels. Every buffer's channel count
is rounded up to a multiple of CHANNEL_ALIGN (the tail is never read): then each pixel's
channels start on a 32-byte boundary and Triton sees strides divisible by 16, so its loads are
vectorised and pipelined whatever the growth rate (k = 12 or 40 spilled registers without it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .spec import DenseNetSpec
from .tiles import LayerKey, TunedTable, choose_tiles
from .variants import KernelChoice

CHANNEL_ALIGN = 16  # elements: Triton specialises integer arguments on divisibility by 16


def _aligned(channels: int) -> int:
    return -(-channels // CHANNEL_ALIGN) * CHANNEL_ALIGN


@dataclass(frozen=True)
class View:
    """A channel slice [start, stop) of a named buffer."""

    buffer: str
    start: int
    stop: int


@dataclass(frozen=True)
class Stage:
    name: str
    op: str  # "conv", "transition", "max_pool", "head", "classifier"
    reads: View
    writes: View
    weights: dict = field(default_factory=dict)  # launcher argument -> folded tensor name
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    relu_out: bool = False


def buffer_shapes(spec: DenseNetSpec, height: int, width: int) -> dict[str, tuple[int, int, int]]:
    """(H, W, C) of every named buffer for one image; C is rounded up to CHANNEL_ALIGN."""
    sizes = spec.feature_sizes(height, width)
    shapes = {}
    if spec.stem == "imagenet":
        shapes["stem"] = ((height - 1) // 2 + 1, (width - 1) // 2 + 1, _aligned(spec.num_init_features))
    for b, ((h, w), (_, c_end)) in enumerate(zip(sizes, spec.block_channels()), 1):
        shapes[f"block{b}"] = (h, w, _aligned(c_end))
    if spec.bn_size is not None:
        # One scratch for every bottleneck layer, as large as the largest block needs.
        shapes["bottleneck_scratch"] = (max(h * w for h, w in sizes), 1, _aligned(spec.bn_size * spec.growth_rate))
    return shapes


def memory_layout(spec: DenseNetSpec, n: int, height: int, width: int):
    """Where each buffer lives for a batch of n: (shapes, arena of each block/stem buffer,
    elements of each arena, elements of the bottleneck scratch).

    Two arenas, used alternately by consecutive blocks (block b is dead once transition b has
    read it); the stem's conv output goes in the arena block 1 does not use.
    """
    shapes = buffer_shapes(spec, height, width)
    arena_of = {name: (int(name[5:]) - 1) % 2 for name in shapes if name.startswith("block")}
    if "stem" in shapes:
        arena_of["stem"] = 1
    arena_numel = [0, 0]
    for name, a in arena_of.items():
        arena_numel[a] = max(arena_numel[a], n * math.prod(shapes[name]))
    scratch_numel = n * math.prod(shapes["bottleneck_scratch"]) if "bottleneck_scratch" in shapes else 0
    return shapes, arena_of, arena_numel, scratch_numel


def stem_v2_workspace(spec: DenseNetSpec, stem: Stage, n: int, height: int, width: int) -> tuple[int, bool]:
    """The stem v2's packed copy of the input: (its elements, whether block 1's arena holds them).
    The arena lends them where it is large enough and the stem writes elsewhere: nothing there is
    live until max-pool writes block 1, after the stem has read the copy. Plans and the engine's
    planned bytes both ask here."""
    from . import kernels

    c_in = stem.reads.stop - stem.reads.start
    numel = kernels.stem_workspace_numel(n, c_in, stem.kernel_size, stem.padding, height, width)
    block1_arena_numel = memory_layout(spec, n, height, width)[2][0]
    return numel, stem.writes.buffer == "stem" and block1_arena_numel >= numel


def build_stages(spec: DenseNetSpec) -> list[Stage]:
    """The network as a list of kernel launches, in order."""
    stages = _stem_stages(spec)
    transitions, last = spec.transition_channels(), len(spec.block_config)
    for b, ((c_in, c_end), layers) in enumerate(zip(spec.block_channels(), spec.block_config), 1):
        for i in range(layers):
            stages += _dense_layer_stages(spec, b, i, c_in + i * spec.growth_rate)
        if b < last:
            t = f"transition{b}"
            weights = {"weight": f"{t}.conv.weight", "in_scale": f"{t}.norm.scale", "in_shift": f"{t}.norm.shift"}
            stages.append(
                Stage(
                    t, "transition", View(f"block{b}", 0, c_end), View(f"block{b + 1}", 0, transitions[b - 1]), weights
                )
            )
    return stages + _head_stages(spec, f"block{last}")


def _stem_stages(spec: DenseNetSpec) -> list[Stage]:
    """ImageNet: 7x7/2 conv with BN-ReLU folded in, then the 3x3/2 max-pool; CIFAR: one 3x3 conv."""
    c0, image = spec.num_init_features, View("input", 0, spec.in_channels)
    if spec.stem == "cifar":
        weights = {"weight": "conv0.weight"}
        return [Stage("conv0", "conv", image, View("block1", 0, c0), weights, kernel_size=3, stride=1, padding=1)]
    weights = {"weight": "conv0.weight", "bias": "conv0.bias"}
    return [
        Stage("conv0", "conv", image, View("stem", 0, c0), weights, kernel_size=7, stride=2, padding=3, relu_out=True),
        Stage("pool0", "max_pool", View("stem", 0, c0), View("block1", 0, c0)),
    ]


def _dense_layer_stages(spec: DenseNetSpec, b: int, i: int, c: int) -> list[Stage]:
    """Dense layer i of block b, reading the block's first c channels and appending its k."""
    p, block, k = f"denseblock{b}.denselayer{i + 1}", f"block{b}", spec.growth_rate
    prologue = {"in_scale": f"{p}.norm1.scale", "in_shift": f"{p}.norm1.shift"}
    new_channels, conv3x3 = View(block, c, c + k), dict(kernel_size=3, stride=1, padding=1)
    if spec.bn_size is None:  # plain layer: BN-ReLU prologue, 3x3 conv straight into the block buffer
        weights = {"weight": f"{p}.conv1.weight", **prologue}
        return [Stage(f"{p}.conv1", "conv", View(block, 0, c), new_channels, weights, **conv3x3)]
    # relu(BN2(conv1x1(relu(BN1(x))))): BN1 in the prologue, BN2 folded into conv1.
    scratch = View("bottleneck_scratch", 0, spec.bn_size * k)
    weights1 = {"weight": f"{p}.conv1.weight", "bias": f"{p}.conv1.bias", **prologue}
    return [
        Stage(f"{p}.conv1", "conv", View(block, 0, c), scratch, weights1, relu_out=True),
        Stage(f"{p}.conv2", "conv", scratch, new_channels, {"weight": f"{p}.conv2.weight"}, **conv3x3),
    ]


def _head_stages(spec: DenseNetSpec, last_block: str) -> list[Stage]:
    """norm5-ReLU-global average pool into the features, then the classifier where there is one."""
    c_final, features = spec.num_features, View("features", 0, spec.num_features)
    head = Stage(
        "norm5", "head", View(last_block, 0, c_final), features, {"scale": "norm5.scale", "shift": "norm5.shift"}
    )
    if not spec.num_classes:  # a backbone without a classifier ends at the features
        return [head]
    weights = {"weight": "classifier.weight", "bias": "classifier.bias"}
    return [head, Stage("classifier", "classifier", features, View("logits", 0, spec.num_classes), weights)]


def _bn_scale_shift(tensors: dict, prefix: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift, computed in float64."""
    w, b = tensors[f"{prefix}.weight"].double(), tensors[f"{prefix}.bias"].double()
    mean, var = tensors[f"{prefix}.running_mean"].double(), tensors[f"{prefix}.running_var"].double()
    scale = w / torch.sqrt(var + eps)
    return scale, b - mean * scale


def fold_batchnorm(tensors: dict, spec: DenseNetSpec, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Every tensor the stages name, folded and packed, on `device`.

    Scales, shifts and biases stay float32 (the kernels accumulate in float32); conv weights are
    packed in the compute dtype; the classifier runs in float32 on the float32 features.
    """
    from .kernels import pack_conv_weight

    t = {k: v.to(device="cpu") for k, v in tensors.items()}
    folded = {}

    def vec(v):
        return v.to(device=device, dtype=torch.float32).contiguous()

    def packed(w, dt=dtype):
        return pack_conv_weight(w, dt, device)

    def prologue(name, bn_prefix):
        scale, shift = _bn_scale_shift(t, f"features.{bn_prefix}", spec.bn_eps)
        folded[f"{name}.scale"], folded[f"{name}.shift"] = vec(scale), vec(shift)

    w0 = t["features.conv0.weight"].double()
    if spec.stem == "imagenet":
        # norm0 follows conv0 directly: fold it into the weights and a bias.
        scale, shift = _bn_scale_shift(t, "features.norm0", spec.bn_eps)
        folded["conv0.weight"], folded["conv0.bias"] = packed(w0 * scale[:, None, None, None]), vec(shift)
    else:
        folded["conv0.weight"] = packed(w0)
    for b, layers in enumerate(spec.block_config, 1):
        for i in range(layers):
            p = f"denseblock{b}.denselayer{i + 1}"
            prologue(f"{p}.norm1", f"{p}.norm1")
            w1 = t[f"features.{p}.conv1.weight"].double()
            if spec.bn_size is None:
                folded[f"{p}.conv1.weight"] = packed(w1)
            else:
                scale, shift = _bn_scale_shift(t, f"features.{p}.norm2", spec.bn_eps)
                folded[f"{p}.conv1.weight"] = packed(w1 * scale[:, None, None, None])
                folded[f"{p}.conv1.bias"] = vec(shift)
                folded[f"{p}.conv2.weight"] = packed(t[f"features.{p}.conv2.weight"].double())
        if b < len(spec.block_config):
            prologue(f"transition{b}.norm", f"transition{b}.norm")
            folded[f"transition{b}.conv.weight"] = packed(t[f"features.transition{b}.conv.weight"].double())
    prologue("norm5", "norm5")
    if spec.num_classes:
        folded["classifier.weight"] = packed(t["classifier.weight"].double()[:, :, None, None], torch.float32)
        folded["classifier.bias"] = vec(t["classifier.bias"])
    return folded


def stage_op(stage: Stage) -> str:
    """The op a stage is tiled and its kernel variant chosen under (densetriton.variants.OP_VARIANTS)."""
    if stage.op != "conv":
        return stage.op
    if stage.reads.buffer == "input":
        return "stem"
    return "conv1x1" if stage.kernel_size == 1 else "conv3x3"


# The launcher of each convolution variant (same arguments, see densetriton.kernels) and the
# options the variant adds to it.
CONV_LAUNCHERS = {
    "v1": ("bn_relu_conv", {}),
    "v2": ("bn_relu_conv_v2", {}),
    "v2-pdl": ("bn_relu_conv_v2", {"pdl": True}),
}


def conv_launcher(variant: str):
    from . import kernels

    name, options = CONV_LAUNCHERS[variant]
    launcher = getattr(kernels, name)
    return functools.partial(launcher, **options) if options else launcher


def _block_of(stage: Stage) -> str:
    """The block a stage serves, whose spatial size its scratch takes: the one it writes, else reads."""
    return stage.writes.buffer if stage.writes.buffer.startswith("block") else stage.reads.buffer


def launch_tiles(
    stage: Stage, n: int, out_hw: tuple, c_in: int, c_out: int, *, dtype, kernel_choice, interpreted, tuned
) -> tuple[str, dict]:
    """A stage's kernel variant and launch configuration (densetriton.tiles)."""
    op = stage_op(stage)
    variant = kernel_choice.of(op)
    dtype = torch.float32 if op == "classifier" else dtype  # the classifier runs on float32 features
    key = LayerKey(op, variant, str(dtype).removeprefix("torch."), n, *out_hw, c_in, c_out, stage.kernel_size)
    return variant, choose_tiles(key, interpreted=interpreted, tuned=tuned)


def plan_split_k_workspace_numel(spec: DenseNetSpec, stages, n: int, height: int, width: int, tiles_of) -> int:
    """Float32 elements of the one workspace a plan's split-K launches share (they run one after
    another): the largest any dense-layer conv asks for, 0 where none splits. `tiles_of` is
    launch_tiles with the plan's choices bound; plans and the engine's planned bytes both ask here."""
    from . import kernels

    shapes, need = buffer_shapes(spec, height, width), 0
    for stage in stages:
        if stage_op(stage) in ("conv1x1", "conv3x3"):
            hw = shapes[_block_of(stage)][:2]  # a dense layer's convs keep its block's size
            c_in, c_out = stage.reads.stop - stage.reads.start, stage.writes.stop - stage.writes.start
            _, tiles = tiles_of(stage, n, hw, c_in, c_out)
            need = max(need, kernels.split_k_workspace_numel(n * hw[0] * hw[1], c_out, tiles.get("SPLIT_K", 1)))
    return need


class Plan:
    """Buffers and bound launches for one (N, H, W): built once, then run many times."""

    def __init__(
        self,
        spec,
        stages,
        folded,
        *,
        n: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device,
        interpreted: bool,
        kernel_choice: KernelChoice | None = None,
        tuned: TunedTable | None = None,
    ):
        from . import kernels

        self.spec, self.key, self.dtype = spec, (n, height, width), dtype
        self.kernel_choice = kernel_choice or KernelChoice()
        self.tuned, self.interpreted = tuned, interpreted
        shapes, arena_of, arena_numel, scratch_numel = memory_layout(spec, n, height, width)
        self.arenas = [torch.empty(m, dtype=dtype, device=device) for m in arena_numel]
        self.buffers = {
            name: self.arenas[a][: n * math.prod(shapes[name])].view(n, *shapes[name]) for name, a in arena_of.items()
        }
        self.scratch = torch.empty(scratch_numel, dtype=dtype, device=device) if scratch_numel else None
        self.features = torch.empty(n, spec.num_features, dtype=torch.float32, device=device)
        split_numel = plan_split_k_workspace_numel(spec, stages, n, height, width, self._tiles)
        self.split_k_workspace = torch.empty(split_numel, dtype=torch.float32, device=device) if split_numel else None
        owned = [*self.arenas, self.features] + [t for t in (self.scratch, self.split_k_workspace) if t is not None]
        self.nbytes = sum(t.numel() * t.element_size() for t in owned)

        self.graph = None  # a CUDA graph of graph_launches(), once captured
        self.graph_failed = False
        self.launches = []  # (stage, callable(x, logits))
        for stage in stages:
            self.launches.append((stage, self._bind(stage, folded, kernels, n, shapes)))

    def _view(self, v: View, n, shapes, block_hw):
        if v.buffer == "bottleneck_scratch":
            (h, w), c = block_hw, shapes["bottleneck_scratch"][2]
            return self.scratch[: n * h * w * c].view(n, h, w, c)[..., v.start : v.stop]
        if v.buffer == "features":
            return self.features[:, v.start : v.stop]
        return self.buffers[v.buffer][..., v.start : v.stop]

    def _tiles(self, stage: Stage, n: int, out_hw: tuple, c_in: int, c_out: int) -> tuple[str, dict]:
        choices = dict(dtype=self.dtype, kernel_choice=self.kernel_choice, interpreted=self.interpreted)
        return launch_tiles(stage, n, out_hw, c_in, c_out, tuned=self.tuned, **choices)

    def _bind(self, stage, folded, kernels, n, shapes):
        w = {arg: folded[name] for arg, name in stage.weights.items()}
        # The scratch takes the spatial size of the block it serves.
        block = _block_of(stage)
        block_hw = shapes[block][:2] if block in shapes else None
        c_in, c_out = stage.reads.stop - stage.reads.start, stage.writes.stop - stage.writes.start
        if stage.op == "conv" and stage.reads.buffer == "input":
            out = self._view(stage.writes, n, shapes, None)
            variant, tiles = self._tiles(stage, n, out.shape[1:3], c_in, c_out)
            if variant == "v2":
                return self._bind_stem_v2(stage, w, out, c_in, tiles, kernels)
            conv = functools.partial(
                conv_launcher(variant),
                weight=w["weight"],
                out=out,
                bias=w.get("bias"),
                kernel_size=stage.kernel_size,
                stride=stage.stride,
                padding=stage.padding,
                relu_out=stage.relu_out,
                **tiles,
            )
            # The stem reads the caller's NCHW tensor in place, through an NHWC-ordered view.
            return lambda x, logits: conv(x.permute(0, 2, 3, 1))
        if stage.op == "classifier":
            feats = self.features.view(n, 1, 1, c_in)
            variant, tiles = self._tiles(stage, n, (1, 1), c_in, c_out)
            if variant == "v2":  # features [N, C] -> logits [N, classes], split TF32 products
                classify = functools.partial(kernels.classifier_v2, self.features, w["weight"], bias=w["bias"], **tiles)
                return lambda x, logits: classify(out=logits)
            conv = functools.partial(conv_launcher(variant), feats, w["weight"], kernel_size=1, bias=w["bias"], **tiles)
            return lambda x, logits: conv(logits.view(n, 1, 1, c_out))
        x = self._view(stage.reads, n, shapes, block_hw)
        out = self._view(stage.writes, n, shapes, block_hw)
        # The head's output has no pixels: its tiles follow the input's.
        variant, tiles = self._tiles(stage, n, (out if out.dim() == 4 else x).shape[1:3], c_in, c_out)
        if stage.op == "conv":
            if tiles.get("SPLIT_K", 1) > 1:  # partials in the plan's workspace, sized for every split launch
                tiles = {**tiles, "workspace": self.split_k_workspace}
            launch = functools.partial(
                conv_launcher(variant),
                x,
                w["weight"],
                out,
                kernel_size=stage.kernel_size,
                stride=stage.stride,
                padding=stage.padding,
                in_scale=w.get("in_scale"),
                in_shift=w.get("in_shift"),
                bias=w.get("bias"),
                relu_out=stage.relu_out,
                **tiles,
            )
        elif stage.op == "transition":
            launch = functools.partial(
                kernels.bn_relu_avgpool_conv,
                x,
                w["weight"],
                out,
                in_scale=w["in_scale"],
                in_shift=w["in_shift"],
                **tiles,
            )
        elif stage.op == "max_pool":
            launch = functools.partial(kernels.max_pool_3x3_s2, x, out, **tiles)
        elif stage.op == "head":
            launch = functools.partial(kernels.bn_relu_global_avgpool, x, w["scale"], w["shift"], out, **tiles)
        else:
            raise AssertionError(f"unknown stage op {stage.op!r}")
        return lambda x_, logits: launch()

    def _bind_stem_v2(self, stage, w, out, c_in, tiles, kernels):
        """The stem through a packed copy of the input (kernels.stem_v2), in block 1's arena where
        stem_v2_workspace says it may lend it."""
        (n, height, width), dtype = self.key, self.dtype
        numel, lent = stem_v2_workspace(self.spec, stage, n, height, width)
        workspace = self.arenas[0] if lent else torch.empty(numel, dtype=dtype, device=self.arenas[0].device)
        self.nbytes += 0 if lent else numel * workspace.element_size()
        conv = kernels.bind_stem_conv_v2(
            w["weight"],
            out,
            in_channels=c_in,
            height=height,
            width=width,
            kernel_size=stage.kernel_size,
            stride=stage.stride,
            padding=stage.padding,
            bias=w.get("bias"),
            relu_out=stage.relu_out,
            workspace=workspace,
            **tiles,
        )
        return lambda x, logits: conv(x.permute(0, 2, 3, 1))

    def run(self, x: torch.Tensor, logits: torch.Tensor | None) -> None:
        """Launch every stage; stop after the features when no logits tensor is given."""
        for stage, launch in self.launches:
            if stage.op == "classifier" and logits is None:
                break
            launch(x, logits)

    def graph_launches(self) -> list:
        """What a CUDA graph of this plan holds: every launch but the two that touch the caller's
        tensors, the stem (it reads the input in place) and the classifier, where there is one (it
        writes the returned logits). Both the graph's ends are this plan's own buffers."""
        end = -1 if self.launches[-1][0].op == "classifier" else None
        return [launch for _, launch in self.launches[1:end]]

    def capture(self, x: torch.Tensor, logits: torch.Tensor | None, stream: torch.cuda.Stream) -> None:
        """Record graph_launches() in one CUDA graph, which logits and features calls both replay.

        ~200 launches cost more host time than a small batch costs the GPU; a replay is one.
        The graph bakes in its pointers, so it holds none of the caller's tensors.
        """
        self.run(x, logits)  # compiles every kernel the graph holds: nothing may compile while capturing
        caller_stream = torch.cuda.current_stream(x.device)
        caller_stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (other callers, other engines) during the
        # capture neither fail nor break it. The stream is the executor's, on the engine's device.
        try:
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                for launch in self.graph_launches():
                    launch(None, None)
        except BaseException:
            _close_failed_capture(graph, x.device, caller_stream)
            raise
        self.graph = graph

    def replay(self, x: torch.Tensor, logits: torch.Tensor | None) -> None:
        """The forward as two or three launches: the stem, the graph, and the classifier when
        logits are asked for."""
        (_, stem), *_, (_, classifier) = self.launches
        stem(x, logits)
        self.graph.replay()
        if logits is not None:
            classifier(x, logits)


def _close_failed_capture(graph: torch.cuda.CUDAGraph, device: torch.device, caller_stream) -> None:
    """Undo what torch leaves open when a capture is invalidated: capture_end raises before it
    ends the allocator's routing into the graph's memory pool (every later empty_cache() would
    then fail an internal assert) and before it restores the caller's stream. Private APIs,
    looked up by name and used best effort: on a capture that closed itself, ending it raises.

    capture_end also raises before it takes the device's default RNG out of capture mode, after
    which every torch.randn on that device fails ("Offset increment outside graph capture"):
    the generator gets a copy of its state (same seed and offset, not capturing). A graph of the
    caller's own that drew random numbers from the old state would no longer advance it."""
    torch.cuda.set_stream(caller_stream)
    try:
        generator = torch.cuda.default_generators[device.index]
        generator.graphsafe_set_state(generator.clone_state())
    except Exception:  # noqa: BLE001 -- torch without graph-safe generator states: nothing to undo
        pass
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    release = getattr(torch._C, "_cuda_releasePool", None)
    if end is None or release is None:
        return
    try:
        pool = graph.pool()
        end(device.index, pool)
    except Exception:
        return  # the capture had closed itself (the error came from one of our launches)
    try:
        release(device.index, pool)  # the graph never owned the pool, so nothing else frees it
    except Exception:
        pass
