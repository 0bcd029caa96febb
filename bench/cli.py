"""`densetriton bench` and `densetriton tune`: the subcommands. Kept light: torch is imported only when one runs."""

from __future__ import annotations

from .schema import PEER_IDS

BENCH_MODELS = ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264")  # ImageNet stems


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark densetriton against torchvision and torch.compile; results go to bench/results/",
        description="Time densetriton and its peers (torchvision eager float32, torchvision eager 16-bit channels_last, "
        "torch.compile default, reduce-overhead and max-autotune, onnxruntime float16 where it has a GPU execution "
        "provider) on the same weights and inputs, in one process. Prints a table and "
        "writes <date>-<device>.json, .md and .png under --out. Defaults: densenet121 and densenet201, batches 1 8 64 "
        "256, float16 (bfloat16 on CPU), 224x224, every peer (the compile peers run on CPU only when named). "
        "--quick: few repeats; on CPU also densenet121 only, batches 1 2.",
    )
    _add_what_to_run(p)
    _add_how_to_run(p)
    _add_end_to_end(p)
    p.set_defaults(func=run)
    register_tune(sub)


def _add_what_to_run(p) -> None:
    p.add_argument(
        "--model",
        nargs="+",
        action="extend",
        choices=BENCH_MODELS,
        metavar="NAME",
        help="models (default densenet121 densenet201; one of: " + ", ".join(BENCH_MODELS) + ")",
    )
    p.add_argument(
        "--batch-size", nargs="+", action="extend", type=int, metavar="N", help="batch sizes (default 1 8 64 256)"
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        action="extend",
        choices=("float16", "bfloat16", "float32"),
        help="compute dtypes of densetriton and the 16-bit peers (default float16; bfloat16 on CPU)",
    )
    p.add_argument("--image-size", type=int, metavar="S", help="square input size (default 224)")
    p.add_argument(
        "--peers",
        nargs="+",
        action="extend",
        choices=PEER_IDS,
        metavar="PEER",
        help="peers to run (default all; " + ", ".join(PEER_IDS) + ")",
    )


def _add_how_to_run(p) -> None:
    p.add_argument(
        "--quick",
        action="store_true",
        help="few repeats (on CPU also smaller defaults); under 2 minutes on 2 CPU cores",
    )
    p.add_argument("--out", metavar="DIR", help="where the results files go (default bench/results/)")
    p.add_argument("--device", help="cpu or cuda[:N] (default cuda when available)")
    p.add_argument(
        "--repeats", type=int, metavar="N", help="timed repeats per record, instead of filling a time target"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument(
        "--budget-s",
        type=float,
        metavar="S",
        help="start no new record after S seconds; the rest are listed as skipped",
    )
    p.add_argument(
        "--warm-caches",
        action="store_true",
        help="keep Triton's and Inductor's on-disk caches (default: empty ones, so cold start is cold)",
    )
    p.add_argument(
        "--kinds-method",
        choices=("graph", "ablation", "kind-graphs", "launches"),
        default="graph",
        help="how densetriton's per-layer-kind times are taken on a GPU: graph (one CUDA graph, timing "
        "events between kinds; default), ablation (the whole graph's time less that of a graph without "
        "the kind), kind-graphs (a graph per run of one kind), launches (an event pair around each "
        "launch, no graph: adds the launch gaps a graph hides)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_end_to_end(p) -> None:
    """Files -> predictions instead of the model bench (bench/end_to_end.py)."""
    p.add_argument(
        "--end-to-end",
        nargs="?",
        const="",
        metavar="DIR",
        help="instead of the model bench: files -> predictions in images/s (engine only, predict --decode "
        "gpu and cpu, torchvision's DataLoader pipeline) over the JPEGs in DIR, or generated photos without "
        "DIR; the first --model, --batch-size and --dtype (defaults densenet121, 256 on CUDA, float16)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="W",
        help="--end-to-end: DataLoader workers of every peer (default: the CPUs less one on CUDA)",
    )


def register_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="sweep kernel tiles per layer shape on a GPU and write a tuned table",
        description="For every GEMM layer shape of the models' plans, heaviest first: candidate tiles around the "
        "current choice, each checked against the v1 kernel on random inputs (outputs poisoned first) before it is "
        "timed; the fastest that beats the current tiles by 3% goes into the table that engines on this GPU and "
        "triton read (<densetriton cache>/tuned/<gpu>-triton<major.minor>.json, merged; or --out). Nothing is tuned "
        "at load time.",
    )
    p.add_argument(
        "--model",
        nargs="+",
        action="extend",
        choices=BENCH_MODELS,
        metavar="NAME",
        help="models whose layer shapes are tuned (default densenet121; one of: " + ", ".join(BENCH_MODELS) + ")",
    )
    p.add_argument("--batch-size", nargs="+", action="extend", type=int, metavar="N", help="batch sizes (default 1)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="default float16")
    p.add_argument("--image-size", type=int, default=224, metavar="S", help="square input size (default 224)")
    p.add_argument(
        "--budget-s",
        type=float,
        metavar="S",
        help="start no candidate after S seconds (default: no limit); what was measured is written",
    )
    p.add_argument("--repeats", type=int, default=20, metavar="N", help="timed launches per candidate (default 20)")
    p.add_argument(
        "--out",
        metavar="FILE|DIR",
        help="where the table goes: a file, or a folder (e.g. the package's "
        "kernels/tuned/) for the standard name (default: the densetriton cache's tuned/ folder)",
    )
    p.set_defaults(func=run_tune)


def run_tune(args) -> int:
    from .tune import run as tune

    return tune(args)


def run(args) -> int:
    if getattr(args, "end_to_end", None) is not None:  # bench/end_to_end.py
        from .end_to_end import main_from_cli

        return main_from_cli(args)
    from . import report
    from .run import resolve
    from .run import run as run_bench

    settings = resolve(args)
    doc, paths = run_bench(settings, progress=not args.no_progress)
    print(report.text_table(doc), end="")
    for p in paths.values():
        print(f"wrote {p}")
    return 0
