"""DenseNet architectures as data: the spec, the registry, and what follows from a spec.

A `DenseNetSpec` names the paper's hyper-parameters (Huang et al. 2017): growth rate k,
layers per dense block, the channels of the stem, the bottleneck width factor (the "B" of
DenseNet-BC; None for the plain BN-ReLU-conv3x3 layer) and the transition compression theta
(the "C"), the channels of the input image (3 for RGB; 1 for the grayscale X-ray and CT
models of medical imaging), the classes (0: a backbone without a classifier, for its features
only), and BatchNorm's epsilon (torch's 1e-5; Keras's DenseNet uses 1.001e-5). Everything else -- channel counts, tensor names and shapes, parameter and
multiply-add counts, feature-map sizes -- is derived from it, so the reference model, the
weights validator and the Triton plan all agree by construction.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import numbers
from dataclasses import dataclass

from .limits import MAX_BLOCKS, MAX_CHANNELS, MAX_CLASSES, MAX_LAYERS_PER_BLOCK, OverBound

STEMS = ("imagenet", "cifar")
INVALID = "invalid DenseNetSpec: "


def _whole_number(value) -> int | None:
    """An int from an int, a numpy integer, or a float without a fraction (JSON may write 1000 as
    1e3); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _layer_counts(block_config) -> tuple[int, ...]:
    """block_config as a tuple of ints; more blocks than MAX_BLOCKS is an OverBound, counted
    before any entry is converted."""
    if isinstance(block_config, (str, bytes, dict)) or not hasattr(block_config, "__iter__"):
        raise ValueError(
            f"invalid DenseNetSpec: block_config must be a sequence of layer counts, got {block_config!r:.80}"
        )
    items = (
        list(itertools.islice(block_config, MAX_BLOCKS + 1)) if not hasattr(block_config, "__len__") else block_config
    )
    if len(items) > MAX_BLOCKS:
        count = len(items) if hasattr(block_config, "__len__") else f"more than {MAX_BLOCKS}"
        raise OverBound("len(block_config) (the number of blocks)", count, MAX_BLOCKS, INVALID)
    counts = tuple(_whole_number(b) for b in items)
    if None in counts:
        raise ValueError(
            f"invalid DenseNetSpec: block_config must be whole numbers of layers, got {tuple(items)!r:.80}"
        )
    return counts


NO_CLASSIFIER = (
    "this model has no classifier (a backbone converted without one, num_classes 0): it gives features "
    "only -- engine.features(x), or densetriton embed"
)


@dataclass(frozen=True)
class DenseNetSpec:
    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int | None = 4
    compression: float = 0.5
    num_classes: int = 1000
    stem: str = "imagenet"
    in_channels: int = 3
    bn_eps: float = 1e-5

    def __post_init__(self):
        # Accept lists (e.g. from JSON) but store a tuple so the spec stays hashable.
        object.__setattr__(self, "block_config", _layer_counts(self.block_config))
        problems = self._field_problems()
        if problems:
            raise ValueError("invalid DenseNetSpec: " + "; ".join(problems))
        self._check_bounds()
        for i, c in enumerate(self.transition_channels()):
            if c < 1:
                raise ValueError(f"invalid DenseNetSpec: transition {i + 1} would have {c} output channels")

    def _field_problems(self) -> list[str]:
        """Each field of the wrong type or sign, in words."""

        def positive_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        problems = []
        if not positive_int(self.growth_rate):
            problems.append(f"growth_rate must be a positive int, got {self.growth_rate!r:.40}")
        if not self.block_config or any(b <= 0 for b in self.block_config):
            problems.append(f"block_config must be non-empty positive layer counts, got {self.block_config!r:.80}")
        if not positive_int(self.num_init_features):
            problems.append(f"num_init_features must be a positive int, got {self.num_init_features!r:.40}")
        if self.bn_size is not None and not positive_int(self.bn_size):
            problems.append(f"bn_size must be a positive int or None, got {self.bn_size!r:.40}")
        if not (
            isinstance(self.compression, numbers.Real)
            and not isinstance(self.compression, bool)
            and 0.0 < float(self.compression) <= 1.0
        ):
            problems.append(f"compression (theta) must be in (0, 1], got {self.compression!r:.40}")
        if not (isinstance(self.num_classes, int) and not isinstance(self.num_classes, bool) and self.num_classes >= 0):
            problems.append(f"num_classes must be a positive int, or 0 for no classifier, got {self.num_classes!r:.40}")
        if not (isinstance(self.stem, str) and self.stem in STEMS):
            problems.append(f"stem must be one of {STEMS}, got {self.stem!r:.40}")
        if not positive_int(self.in_channels):
            problems.append(f"in_channels must be a positive int, got {self.in_channels!r:.40}")
        if not (
            isinstance(self.bn_eps, (int, float))
            and not isinstance(self.bn_eps, bool)
            and math.isfinite(self.bn_eps)
            and self.bn_eps > 0
        ):
            problems.append(f"bn_eps must be a positive finite number, got {self.bn_eps!r:.40}")
        return problems

    def _check_bounds(self) -> None:
        """limits.py's bounds on a spec, so that one read from a file cannot make its tensor list, or
        the tensors, huge: the first field over its bound is an OverBound (a ValueError)."""
        for i, layers in enumerate(self.block_config):
            if layers > MAX_LAYERS_PER_BLOCK:
                raise OverBound(
                    f"block_config[{i}] (the layers of block {i + 1})", layers, MAX_LAYERS_PER_BLOCK, INVALID
                )
        fields = [
            ("growth_rate", self.growth_rate, MAX_CHANNELS),
            ("num_init_features", self.num_init_features, MAX_CHANNELS),
            ("in_channels", self.in_channels, MAX_CHANNELS),
            ("num_classes", self.num_classes, MAX_CLASSES),
        ]
        if self.bn_size is not None:
            fields.append(
                ("bn_size x growth_rate (the bottleneck width)", self.bn_size * self.growth_rate, MAX_CHANNELS)
            )
        for what, value, bound in fields:
            if value > bound:
                raise OverBound(what, value, bound, INVALID)
        for i, (_, c_end) in enumerate(self.block_channels()):
            if c_end > MAX_CHANNELS:
                raise OverBound(f"the channels at the end of block {i + 1}", c_end, MAX_CHANNELS, INVALID)

    # -- channel bookkeeping -------------------------------------------------------------

    def block_channels(self) -> list[tuple[int, int]]:
        """(input channels, output channels) of every dense block."""
        out, c = [], self.num_init_features
        for i, layers in enumerate(self.block_config):
            c_end = c + layers * self.growth_rate
            out.append((c, c_end))
            if i + 1 < len(self.block_config):
                c = int(math.floor(self.compression * c_end))
        return out

    def transition_channels(self) -> list[int]:
        """Output channels of each transition: floor(theta * C)."""
        chans, c = [], self.num_init_features
        for layers in self.block_config[:-1]:
            c = int(math.floor(self.compression * (c + layers * self.growth_rate)))
            chans.append(c)
        return chans

    @property
    def num_features(self) -> int:
        """Channels of the pooled features that the classifier sees."""
        return self.block_channels()[-1][1]

    @property
    def bottleneck_channels(self) -> int | None:
        return None if self.bn_size is None else self.bn_size * self.growth_rate

    @property
    def depth(self) -> int:
        """The paper's L: conv and linear layers counted along the main path."""
        per_layer = 1 if self.bn_size is None else 2
        stem = 1
        return stem + per_layer * sum(self.block_config) + (len(self.block_config) - 1) + 1

    # -- tensor names and shapes (torchvision's state-dict layout) -----------------------

    def state_dict_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model under torchvision's names, with its shape, in order."""
        shapes: dict[str, tuple[int, ...]] = {}

        def bn(prefix, c):
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{prefix}.{name}"] = (c,)

        c0 = self.num_init_features
        kernel = 7 if self.stem == "imagenet" else 3
        shapes["features.conv0.weight"] = (c0, self.in_channels, kernel, kernel)
        if self.stem == "imagenet":
            bn("features.norm0", c0)
        k = self.growth_rate
        channels, transitions = self.block_channels(), self.transition_channels()  # once: linear in the blocks
        for b, ((c_in, c_end), layers) in enumerate(zip(channels, self.block_config), start=1):
            for layer in range(layers):
                p = f"features.denseblock{b}.denselayer{layer + 1}"
                c = c_in + layer * k
                bn(f"{p}.norm1", c)
                if self.bn_size is None:
                    shapes[f"{p}.conv1.weight"] = (k, c, 3, 3)
                else:
                    width = self.bn_size * k
                    shapes[f"{p}.conv1.weight"] = (width, c, 1, 1)
                    bn(f"{p}.norm2", width)
                    shapes[f"{p}.conv2.weight"] = (k, width, 3, 3)
            if b < len(self.block_config):
                bn(f"features.transition{b}.norm", c_end)
                shapes[f"features.transition{b}.conv.weight"] = (transitions[b - 1], c_end, 1, 1)
        num_features = channels[-1][1]
        bn("features.norm5", num_features)
        if self.num_classes:  # 0: a backbone without a classifier (features only)
            shapes["classifier.weight"] = (self.num_classes, num_features)
            shapes["classifier.bias"] = (self.num_classes,)
        return shapes

    def num_parameters(self) -> int:
        """Learnable parameters (BatchNorm running statistics excluded, as torch counts)."""
        return sum(
            math.prod(s)
            for name, s in self.state_dict_shapes().items()
            if not name.endswith(("running_mean", "running_var"))
        )

    # -- spatial sizes and arithmetic ----------------------------------------------------

    def min_input_size(self) -> int:
        """Smallest square input every stage accepts (each transition halves, floor)."""
        size = 1
        for _ in range(len(self.block_config) - 1):
            size *= 2
        if self.stem == "imagenet":
            size = 2 * (2 * size - 1) - 1  # undo max-pool 3x3/2 p1, then conv 7x7/2 p3
            size = max(size, 1)
        return size

    def feature_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Spatial size inside each dense block for an input of height x width."""
        if self.stem == "imagenet":
            h, w = (height - 1) // 2 + 1, (width - 1) // 2 + 1  # conv0 7x7/2 p3
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # pool0 3x3/2 p1
        else:
            h, w = height, width
        sizes = []
        for i in range(len(self.block_config)):
            if h < 1 or w < 1:
                raise ValueError(
                    f"input {height}x{width} is too small for this network: block {i + 1} would be {h}x{w}; "
                    f"the smallest input is {self.min_input_size()}x{self.min_input_size()}"
                )
            sizes.append((h, w))
            h, w = h // 2, w // 2
        return sizes

    def macs(self, height: int = 224, width: int | None = None, *, pooled_transitions: bool = False) -> int:
        """Multiply-adds of one image's forward pass (convolutions and the classifier).

        pooled_transitions=True counts the transition conv after the 2x2 average pool, as the
        Triton backend computes it (both are linear, so they commute): 4x fewer there.
        """
        width = height if width is None else width
        sizes = self.feature_sizes(height, width)
        k = self.growth_rate
        total = 0
        channels, transitions = self.block_channels(), self.transition_channels()
        if self.stem == "imagenet":
            oh, ow = (height - 1) // 2 + 1, (width - 1) // 2 + 1
            total += oh * ow * self.num_init_features * self.in_channels * 49
        else:
            total += height * width * self.num_init_features * self.in_channels * 9
        for b, ((c_in, c_end), layers, (h, w)) in enumerate(zip(channels, self.block_config, sizes)):
            for layer in range(layers):
                c = c_in + layer * k
                if self.bn_size is None:
                    total += h * w * c * k * 9
                else:
                    width_ = self.bn_size * k
                    total += h * w * (c * width_ + width_ * k * 9)
            if b + 1 < len(self.block_config):
                pix = (h // 2) * (w // 2) if pooled_transitions else h * w
                total += pix * c_end * transitions[b]
        total += channels[-1][1] * self.num_classes
        return total

    # -- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_config"] = list(self.block_config)
        # Fields added after the first release are left out at their defaults, so files of
        # models that don't use them stay readable by older densetriton versions (from_dict
        # fills them back in).
        for name, default in (("in_channels", 3), ("bn_eps", 1e-5)):
            if d[name] == default:
                del d[name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> DenseNetSpec:
        if not isinstance(d, dict):
            raise ValueError(f"a DenseNetSpec is a JSON object of its fields, got {d!r:.80}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown DenseNetSpec fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> DenseNetSpec:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> DenseNetSpec:
        return dataclasses.replace(self, **changes)


def _cifar(depth: int, k: int, bottleneck: bool, num_classes: int = 10) -> DenseNetSpec:
    """The paper's CIFAR networks: three blocks, a 3x3 stem of 16 (or 2k for BC) channels."""
    if bottleneck:
        layers = (depth - 4) // 6
        return DenseNetSpec(k, (layers,) * 3, 2 * k, 4, 0.5, num_classes, "cifar")
    layers = (depth - 4) // 3
    return DenseNetSpec(k, (layers,) * 3, 16, None, 1.0, num_classes, "cifar")


# torchvision's four ImageNet models, the paper's DenseNet-264 (Table 1), and the paper's
# CIFAR models (Table 2; CIFAR-10 heads).
MODELS: dict[str, DenseNetSpec] = {
    "densenet121": DenseNetSpec(32, (6, 12, 24, 16), 64),
    "densenet161": DenseNetSpec(48, (6, 12, 36, 24), 96),
    "densenet169": DenseNetSpec(32, (6, 12, 32, 32), 64),
    "densenet201": DenseNetSpec(32, (6, 12, 48, 32), 64),
    "densenet264": DenseNetSpec(32, (6, 12, 64, 48), 64),
    "densenet40_k12": _cifar(40, 12, bottleneck=False),
    "densenet100_k12": _cifar(100, 12, bottleneck=False),
    "densenet100_k24": _cifar(100, 24, bottleneck=False),
    "densenet_bc100_k12": _cifar(100, 12, bottleneck=True),
    "densenet_bc250_k24": _cifar(250, 24, bottleneck=True),
    "densenet_bc190_k40": _cifar(190, 40, bottleneck=True),
}

# Registry models whose pretrained weights torchvision publishes.
TORCHVISION_MODELS = ("densenet121", "densenet161", "densenet169", "densenet201")


def list_models() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> DenseNetSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def describe_spec(spec: DenseNetSpec) -> str:
    """A registry name where one fits ("densenet121 with 1 input channel and 14 classes"), else the spec."""
    default = DenseNetSpec()
    for name, s in MODELS.items():
        if s != spec.replace(num_classes=s.num_classes, in_channels=s.in_channels, bn_eps=s.bn_eps):
            continue
        changes = []
        if spec.in_channels != s.in_channels:
            changes.append(f"{spec.in_channels} input channel{'s' * (spec.in_channels != 1)}")
        if not spec.num_classes:
            changes.append("no classifier")
        elif spec.num_classes != s.num_classes:
            changes.append(f"{spec.num_classes} classes")
        if spec.bn_eps != s.bn_eps:
            changes.append(f"BatchNorm eps {spec.bn_eps:g}")
        if len(changes) > 2:
            changes = [", ".join(changes[:-1]), changes[-1]]
        return name + (" with " + " and ".join(changes) if changes else "")
    extras = f", in_channels={spec.in_channels}" if spec.in_channels != default.in_channels else ""
    extras += f", bn_eps={spec.bn_eps:g}" if spec.bn_eps != default.bn_eps else ""
    return (
        f"DenseNet(k={spec.growth_rate}, blocks={list(spec.block_config)}, init={spec.num_init_features}, "
        f"bn_size={spec.bn_size}, theta={spec.compression}, classes={spec.num_classes or 'none'}, stem={spec.stem}{extras})"
    )
