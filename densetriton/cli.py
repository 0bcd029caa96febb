"""The `densetriton` command line: info, convert, bench, predict, embed.

Errors print as one line (`densetriton: error: ...`); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .limits import FileRefused
from .outputs import OutputLock, check_target, refuse_inputs_as_outputs, remove_stale_temps
from .spec import describe_spec


def _info(args) -> int:
    spec, weights = _info_target(args.model)
    size = args.image_size if args.image_size is not None else (224 if spec.stem == "imagenet" else 32)
    if size < spec.min_input_size():
        raise ValueError(
            f"--image-size {size} is too small for this network: the smallest input is "
            f"{spec.min_input_size()}x{spec.min_input_size()}"
        )
    print(args.model if weights is None else f"{args.model}: {describe_spec(spec)}")
    _print_spec(spec, size)
    file_facts = {} if weights is None else _print_file_facts(weights, spec)
    if args.json:
        facts = {
            "spec": spec.to_dict(),
            "parameters": spec.num_parameters(),
            "image_size": size,
            "macs": spec.macs(size),
        }
        print(json.dumps({**facts, **file_facts}))
    return 0


def _info_target(model: str):
    """(spec, weights or None) of a registry name or a weights file."""
    from .spec import MODELS, get_spec, list_models
    from .weights import load_weights

    if model in MODELS:
        return get_spec(model), None
    if Path(model).suffix == ".safetensors" or Path(model).is_file():
        weights = load_weights(model)
        return weights.spec, weights
    if Path(model).is_dir():
        raise ValueError(f"{model} is a folder: info takes a model name ({', '.join(list_models())}) or a weights file")
    return get_spec(model), None  # the unknown-model error, listing the registry


def _print_spec(spec, size: int) -> None:
    layer = (
        f"bottleneck BN-ReLU-conv1x1({spec.bottleneck_channels})-BN-ReLU-conv3x3"
        if spec.bn_size
        else "plain BN-ReLU-conv3x3"
    )
    print(f"  growth rate k       {spec.growth_rate}")
    print(f"  layers per block    {'-'.join(map(str, spec.block_config))}")
    print(f"  layer               {layer}")
    print(f"  compression theta   {spec.compression}")
    print(f"  stem                {spec.stem} ({spec.num_init_features} channels)")
    print(f"  depth L             {spec.depth}")
    print(f"  classes             {spec.num_classes or 'none: no classifier (a backbone: features only)'}")
    if spec.in_channels != 3:
        print(f"  input channels      {spec.in_channels}")
    if spec.bn_eps != 1e-5:
        print(f"  BatchNorm eps       {spec.bn_eps:g}")
    blocks = zip(
        spec.block_channels(), spec.block_config, spec.feature_sizes(size, size), spec.transition_channels() + [None]
    )
    for b, ((c_in, c_out), layers, (h, w), t) in enumerate(blocks, 1):
        end = " -> norm5, global pool" + (", classifier" if spec.num_classes else "")
        tail = f" -> transition -> {t}" if t is not None else end
        print(f"  block {b}: {layers:3d} layers, {h}x{w}, channels {c_in} -> {c_out}{tail}")
    print(f"  parameters          {spec.num_parameters():,}")
    print(f"  multiply-adds       {spec.macs(size):,} at {size}x{size} ({spec.macs(size) / 1e9:.2f} GMACs)")
    print(f"  smallest input      {spec.min_input_size()}x{spec.min_input_size()}")


def _print_file_facts(weights, spec) -> dict:
    """What a weights file records besides its tensors, printed; returned for --json."""
    from .images import describe_preprocessing
    from .weights import listing

    names = weights.class_names
    outputs = {
        True: "a sigmoid per class (multi-label)",
        False: "a softmax over the classes",
        None: "not recorded (softmax)",
    }
    if spec.num_classes:
        print(f"  class names         {listing(names, limit=5) if names else 'none recorded'}")
        print(f"  outputs             {outputs[weights.multi_label]}")
    else:
        print(f"  outputs             {spec.num_features} pooled features (engine.features, densetriton embed)")
    if weights.operating_points is not None:
        print(f"  operating points    {_points(weights.operating_points)} (predict puts each at 0.5)")
    pre = describe_preprocessing(weights.preprocessing) if weights.preprocessing else "none recorded"
    print(f"  preprocessing       {pre}")
    print(f"  source              {weights.source or 'not recorded'}")
    return {
        "class_names": names,
        "multi_label": weights.multi_label,
        "preprocessing": weights.preprocessing,
        "operating_points": weights.operating_points,
        "source": weights.source,
    }


def _points(points) -> str:
    from .weights import listing

    return listing(("none" if p is None else f"{p:.4g}" for p in points), limit=5)


def _read_operating_points(path: str) -> list[float | None]:
    """One per line, in class order; "nan" or "none" for a class without one."""
    points = []
    for n, line in enumerate(_read_text(path, "--operating-points").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if text.lower() in ("nan", "none", "null"):
            points.append(None)
            continue
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{path}, line {n}: {text!r:.40} is not a number (or nan for none)") from None
        if not 0 < value < 1:
            raise ValueError(
                f"{path}, line {n}: {text!r:.40} is not an operating point: a sigmoid output strictly "
                f"between 0 and 1 (or nan for none)"
            )
        points.append(value)
    return points


def _read_text(path: str, option: str) -> str:
    """A small text file named by an option: UTF-8, a byte-order mark (Windows Notepad's) dropped."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{option} {path}: no such file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{option} {path}: not a UTF-8 text file") from None
    except IsADirectoryError:
        raise ValueError(f"{option} {path}: a folder, not a text file") from None
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot be read ({e.strerror or e})") from None


def _read_class_names(path: str) -> list[str]:
    """One name per line; blank lines at the end are ignored, one between names is an error
    (a class without a name, or a slip that would shift every later name). "imagenet", where no
    such file is, names torchvision's ImageNet-1k classes (those of its pretrained weights)."""
    if path == "imagenet" and not os.path.exists(path):
        from torchvision.models import DenseNet121_Weights

        return list(DenseNet121_Weights.IMAGENET1K_V1.meta["categories"])
    lines = [line.strip() for line in _read_text(path, "--class-names").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [n for n, line in enumerate(lines, 1) if not line]
    if blank:
        raise ValueError(f"--class-names {path}: line {blank[0]} is blank; give every class a name, one per line")
    return lines


def _convert(args) -> int:
    if args.arch is None and args.checkpoint is None:
        raise ValueError(
            "give --arch NAME (torchvision's pretrained weights) or --checkpoint FILE (a local checkpoint)"
        )
    if not args.out.lower().endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: a weights file is safetensors, so its name ends in .safetensors")
    class_names = None
    if args.class_names:
        class_names = _read_class_names(args.class_names)
    preprocessing = None
    if args.mean is not None or args.std is not None or args.resize_size is not None or args.crop_size is not None:
        if args.mean is None or args.std is None:
            raise ValueError("give --mean and --std (one value per input channel) with any preprocessing option")
        resize = (
            args.resize_size[0] if args.resize_size is not None and len(args.resize_size) == 1 else args.resize_size
        )
        preprocessing = {"resize_size": resize, "crop_size": args.crop_size, "mean": args.mean, "std": args.std}
    points = _read_operating_points(args.operating_points) if args.operating_points else None
    inputs = [p for p in (args.checkpoint, args.class_names, args.operating_points) if p is not None]
    refuse_inputs_as_outputs([args.out], inputs)
    check_target(args.out)
    with OutputLock(args.out):  # one writer per file; no live run then owns a temp file left beside it
        remove_stale_temps([args.out])
        out = _convert_to(args, class_names, preprocessing, points)
    from .images import describe_preprocessing
    from .spec import describe_spec
    from .weights import load_weights

    w = load_weights(out)
    names = f", {len(w.class_names)} class names" if w.class_names else ""
    print(f"wrote {out}: {describe_spec(w.spec)}, {w.spec.num_parameters():,} parameters{names}")
    if w.multi_label is not None:
        print("  outputs: " + ("a sigmoid per class (multi-label)" if w.multi_label else "a softmax over the classes"))
    if w.operating_points is not None:
        print(f"  operating points: {_points(w.operating_points)} (predict puts each at 0.5)")
    if w.preprocessing is not None:
        print(f"  preprocessing: {describe_preprocessing(w.preprocessing)}")
    else:
        print("  preprocessing: none recorded (--mean/--std to record how the model's images were prepared)")
    return 0


def _convert_to(args, class_names, preprocessing, points) -> str:
    from .weights_tools.convert import convert_checkpoint, convert_torchvision

    if args.checkpoint is not None:
        return convert_checkpoint(
            args.checkpoint,
            args.out,
            arch=args.arch,
            class_names=class_names,
            preprocessing=preprocessing,
            bn_eps=args.bn_eps,
            multi_label=args.multi_label,
            operating_points=points,
            prefix=args.prefix,
        )
    if (
        class_names is not None
        or preprocessing is not None
        or args.bn_eps is not None
        or args.multi_label is not None
        or points is not None
        or args.prefix is not None
    ):
        raise ValueError(
            "--class-names, --bn-eps, --multi-label, --operating-points, --prefix and the preprocessing options "
            "apply to --checkpoint; torchvision's weights carry their own"
        )
    return convert_torchvision(args.arch, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densetriton",
        description="DenseNet inference with fused Triton kernels: convert weights, inspect models, classify, benchmark.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_info_command(sub)
    _add_convert_command(sub)
    for module in ("densetriton.bench.cli", "densetriton.predict", "densetriton.embed", "densetriton.serve"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except ModuleNotFoundError as e:
            if e.name is None or not module.startswith(e.name):
                raise
            continue
        register(sub)
    for command in sub.choices.values():  # --debug after the command as well as before it
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors"
        )
    return parser


def _add_info_command(sub) -> None:
    from .spec import list_models

    p = sub.add_parser("info", help="print a model's or weights file's architecture, parameter count and multiply-adds")
    p.add_argument(
        "model",
        metavar="NAME|FILE",
        help="a registry model (" + ", ".join(list_models()) + ") or a .safetensors weights file, whose "
        "class names, outputs, preprocessing and source are printed too",
    )
    p.add_argument(
        "--image-size", type=int, help="input size for the multiply-add count (default 224; 32 for CIFAR models)"
    )
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    p.set_defaults(func=_info)


def _add_convert_command(sub) -> None:
    from .spec import list_models

    p = sub.add_parser(
        "convert",
        help="convert torchvision's pretrained weights or a checkpoint into a .safetensors weights file",
        description="Convert torchvision's pretrained weights (--arch) or a local checkpoint (--checkpoint: .pth, .pt, "
        ".pth.tar, .safetensors; nested state dicts, 'module.' prefixes, legacy keys, Sequential classifiers, MONAI's "
        "DenseNet, timm's, grayscale stems and backbones without a classifier (features only) are handled; or a Keras DenseNet: .h5, .weights.h5, .keras) into a densetriton "
        "weights file. Pickles are read by densetriton's own restricted reader (never torch.load), with inert "
        "placeholders for the classes they name; Keras configs are read as JSON: no code from a file runs. A file "
        "declaring more than it holds or more than a bound allows is refused (exit status 2).",
    )
    p.add_argument("--out", required=True, help="the .safetensors file to write (written atomically)")
    p.add_argument(
        "--arch",
        choices=list_models(),
        metavar="NAME",
        help="architecture; without --checkpoint, fetch torchvision's weights",
    )
    p.add_argument("--checkpoint", help="a local checkpoint file; the architecture is inferred unless --arch is given")
    p.add_argument(
        "--class-names",
        metavar="FILE",
        help="a text file with one class name per line, stored in the weights file; 'imagenet' for "
        "torchvision's ImageNet-1k names (a model fine-tuned from them, or timm's in1k weights)",
    )
    p.add_argument(
        "--multi-label",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="record that the model was trained multi-label (a sigmoid per class, as chest X-ray models "
        "are), so predict applies a sigmoid; default: what a Keras head applies, else not recorded",
    )
    p.add_argument(
        "--operating-points",
        metavar="FILE",
        help="a text file with one number per line in class order (nan for none): the sigmoid output at "
        "which each class is called positive, as torchxrayvision's op_threshs; predict then reports each "
        "class calibrated so that it sits at 0.5. Implies --multi-label; default: a checkpoint's "
        "op_threshs tensor, else none",
    )
    p.add_argument(
        "--prefix",
        metavar="PREFIX",
        help="convert only the tensors under PREFIX (whole key components), or the state dict the "
        "checkpoint keeps under that name: for a checkpoint holding more than one model (model_ema. "
        "beside model., timm's state_dict_ema beside state_dict)",
    )
    p.add_argument(
        "--bn-eps",
        type=float,
        metavar="EPS",
        help="the model's BatchNorm epsilon, which no tensor shows (default: what a Keras file says, "
        "else torch's 1e-5)",
    )
    g = p.add_argument_group(
        "preprocessing",
        "how the model's images were prepared in training, stored in the file for predict and embed: resize the "
        "shorter side, center-crop, scale to 0..1 (grayscale for a 1-channel model), normalise. Default: "
        "torchvision's ImageNet preprocessing for an RGB ImageNet-stem model, else none recorded",
    )
    g.add_argument("--mean", type=float, nargs="+", metavar="M", help="per-channel mean after scaling to 0..1")
    g.add_argument("--std", type=float, nargs="+", metavar="S", help="per-channel standard deviation")
    g.add_argument(
        "--resize-size",
        type=int,
        nargs="+",
        metavar="N",
        help="resize the shorter side to N, or with two values to exactly H W as Keras pipelines do "
        "(default: no resize)",
    )
    g.add_argument("--crop-size", type=int, metavar="N", help="center-crop to NxN (default: no crop)")
    p.set_defaults(func=_convert)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"densetriton: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    formatwarning = warnings.formatwarning
    if not args.debug:
        warnings.formatwarning = _one_line_warning  # a sentence for the user, not a source location
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("densetriton: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"densetriton: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, FileRefused) else 1  # 2: a file refused before it was read
    finally:
        warnings.formatwarning = formatwarning
