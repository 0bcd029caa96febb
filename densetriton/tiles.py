"""Tile policy: the launch configuration of every op, as data.

One place per op: the heuristic tables below (what the kernels were sized to on sm_90 by reading
ptxas, `python -m densetriton.bench.kernel_report`), then a tuned table per (GPU, triton
major.minor) where one exists: JSON files named `<gpu>-triton<major.minor>.json` (the GPU's name
lower-cased, every run of other characters turned into one '-', e.g. nvidia-h100-80gb-hbm3),
read from the user's cache (`<densetriton cache>/tuned/`) first and then from the package's
`kernels/tuned/`. A tuned entry wins for its exact layer shape; the heuristics cover the rest.

A tuned table:

    {"format": "densetriton-tuned-tiles", "version": 1, "gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6",
     "entries": [{"op": "conv1x1", "variant": "v2", "dtype": "float16", "batch": 256, "height": 56,
                  "width": 56, "c_in": 128, "c_out": 128, "kernel_size": 1,
                  "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3,
                  "split_k": 1}]}

height and width are the output's. split_k > 1 splits the K sum over that many programs per tile
(SPLIT_K_VARIANTS: the ops and variants whose kernel can); every other entry's is 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

TUNED_FORMAT, TUNED_VERSION = "densetriton-tuned-tiles", 1
GEMM_OPS = ("stem", "conv1x1", "conv3x3", "transition", "classifier")
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


@dataclass(frozen=True)
class LayerKey:
    """One launch's shape: what a tuned entry is keyed by."""

    op: str
    variant: str
    dtype: str  # "float16", "bfloat16", "float32"
    batch: int
    height: int  # of the output (of the input for the head, whose output has no pixels)
    width: int
    c_in: int
    c_out: int
    kernel_size: int

    @property
    def rows(self) -> int:
        return self.batch * self.height * self.width

    @property
    def pixels(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class GemmRule:
    """Heuristic tiles of a GEMM op: each tile grows with its axis from 16 to a cap."""

    block_m: int  # below large_rows output rows
    block_m_large: int  # from large_rows on
    large_rows: int
    max_n: int
    max_k: int
    min_k: int
    eight_warps: tuple  # (BLOCK_M, BLOCK_N) minimums, any of which gives 8 warps (else 4)


# GPU tiles per (op, dtype class), read off ptxas for sm_90 (registers, spills, shared memory):
# - a 128x128 float32 accumulator is 128 registers per thread at 4 warps; with the prologue the
#   16-bit kernels hit the 255 cap and spill (128x64 spilled at k = 40): 8 warps halve it;
# - float32 computes IEEE products on the FMA units, operands in registers: K steps of 32 or 64
#   spill at any tile, 16 does not; the float32 transition's four pipelined 2x2-window loads
#   need 361 KB of shared memory at K = 64 (the H100 has 227): K <= 32;
# - the stem's flat K walk (7*7*3 = 147 in 5 steps of 32) gathers from the caller's NCHW tensor
#   element by element: at most 64 columns and 8 warps keep every dtype from spilling;
# - the classifier (float32 features, one row per image): 16-row tiles (64 rows spilled).
_CONV16 = GemmRule(64, 128, 4096, 128, 64, 16, ((128, 64),))
_CONV32 = GemmRule(64, 128, 4096, 128, 16, 16, ((64, 64), (128, 32)))
GPU_TILES = {
    #  op,          dtype class   rule (BLOCK_M, from large_rows BLOCK_M, large_rows, max N, max K, min K, 8 warps)
    ("stem", "16-bit"): GemmRule(64, 128, 4096, 64, 32, 32, ((16, 16),)),
    ("stem", "float32"): GemmRule(64, 128, 4096, 64, 32, 32, ((16, 16),)),
    ("conv1x1", "16-bit"): _CONV16,
    ("conv1x1", "float32"): _CONV32,
    ("conv3x3", "16-bit"): _CONV16,
    ("conv3x3", "float32"): _CONV32,
    ("transition", "16-bit"): _CONV16,
    ("transition", "float32"): GemmRule(64, 128, 4096, 128, 32, 16, ((128, 64),)),
    ("classifier", "float32"): GemmRule(16, 16, 0, 128, 16, 16, ()),
}
# Split-K (bn_relu_conv_v2's SPLIT_K): a launch of fewer programs than one wave of the GPU's SMs
# splits its K steps, doubling the programs while they stay within the wave and each split keeps
# MIN_STEPS_PER_SPLIT steps (batch 1's block 4 is one program streaming 30 K steps of weights).
SPLIT_K_VARIANTS = {(op, v) for op in ("conv1x1", "conv3x3") for v in ("v2", "v2-pdl")}
SM_WAVE = 132  # the H100's and H200's SMs
MAX_SPLIT_K = 8
MIN_STEPS_PER_SPLIT = 4
# Under Triton's interpreter every program instance costs Python time: the largest tiles.
INTERPRETER_TILES = GemmRule(256, 256, 0, 128, 128, 16, ())
# The pooling ops: (axis the tile follows, smallest, largest) or a fixed size.
POOL_TILES = {
    "max_pool": {"BLOCK_M": 64, "BLOCK_C": ("c_out", 16, 64)},
    "head": {"BLOCK_C": ("c_out", 16, 128), "BLOCK_HW": ("pixels", 16, 64)},
}


def _fit(n: int, lo: int, hi: int) -> int:
    """The smallest power of two from lo that covers n, at most hi."""
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _dtype_class(dtype: str) -> str:
    return "float32" if dtype == "float32" else "16-bit"


def gemm_tiles(rule: GemmRule, rows: int, k: int, c_out: int) -> dict:
    """A GemmRule applied to one launch (k: the GEMM's K step axis, e.g. KH*KW*Cin for the stem)."""
    m = (
        _fit(rows, 16, rule.block_m_large)
        if rule is INTERPRETER_TILES
        else (rule.block_m_large if rows >= rule.large_rows else rule.block_m)
    )
    tiles = {"BLOCK_M": m, "BLOCK_N": _fit(c_out, 16, rule.max_n), "BLOCK_K": _fit(k, rule.min_k, rule.max_k)}
    if rule is not INTERPRETER_TILES:
        big = any(m >= min_m and tiles["BLOCK_N"] >= min_n for min_m, min_n in rule.eight_warps)
        tiles["num_warps"] = 8 if big else 4
    return tiles


def split_k(key: LayerKey, tiles: dict) -> int:
    """The heuristic split of a launch's K steps (1: none); see SM_WAVE."""
    if (key.op, key.variant) not in SPLIT_K_VARIANTS:
        return 1
    programs = -(-key.rows // tiles["BLOCK_M"]) * -(-key.c_out // tiles["BLOCK_N"])
    steps = key.kernel_size**2 * -(-key.c_in // tiles["BLOCK_K"])
    split = 1
    while split < MAX_SPLIT_K and programs * split * 2 <= SM_WAVE and steps // (split * 2) >= MIN_STEPS_PER_SPLIT:
        split *= 2
    return split


def heuristic_tiles(key: LayerKey, *, interpreted: bool) -> dict:
    """The tables' launch configuration for one layer."""
    if key.op in POOL_TILES:
        axes = {"c_out": key.c_out, "pixels": key.pixels}
        return {
            name: v if isinstance(v, int) else _fit(axes[v[0]], v[1], v[2]) for name, v in POOL_TILES[key.op].items()
        }
    k = key.c_in * key.kernel_size**2 if key.op == "stem" else key.c_in
    if interpreted:
        return gemm_tiles(INTERPRETER_TILES, key.rows, k, key.c_out)
    tiles = gemm_tiles(GPU_TILES[key.op, _dtype_class(key.dtype)], key.rows, k, key.c_out)
    split = split_k(key, tiles)
    return {**tiles, "SPLIT_K": split} if split > 1 else tiles


class TunedTable:
    """A tuned table's entries by LayerKey (see the module docstring for the file format)."""

    def __init__(self, entries: dict, path: Path | None = None):
        self.entries, self.path = entries, path

    def get(self, key: LayerKey) -> dict | None:
        tiles = self.entries.get(key)
        return None if tiles is None else dict(tiles)


def choose_tiles(key: LayerKey, *, interpreted: bool, tuned: TunedTable | None = None) -> dict:
    """The tuned entry for this exact layer where there is one (on a GPU), else the heuristics."""
    found = None if interpreted or tuned is None else tuned.get(key)
    return found if found is not None else heuristic_tiles(key, interpreted=interpreted)


def gpu_slug(gpu_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")


def tuned_table_name(gpu_name: str, triton_version: str) -> str:
    """<gpu>-triton<major.minor>.json for a device name and a triton version string."""
    major_minor = ".".join(triton_version.split("+")[0].split(".")[:2])
    return f"{gpu_slug(gpu_name)}-triton{major_minor}.json"


def find_tuned_table(gpu_name: str, triton_version: str, directories) -> TunedTable | None:
    """The first directory's table for this GPU and triton, loaded; None where none has one."""
    for directory in directories:
        path = Path(directory) / tuned_table_name(gpu_name, triton_version)
        if path.is_file():
            return load_tuned_table(path)
    return None


def _entry(item, where: str) -> tuple[LayerKey, dict]:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: an entry must be an object, got {type(item).__name__}")
    fields = {name: item.get(name) for name in LayerKey.__dataclass_fields__}
    missing = [name for name, v in fields.items() if v is None] + [t for t in TILE_KEYS if t not in item]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(item) - set(fields) - set(TILE_KEYS) - {"split_k"})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    key = LayerKey(**fields)
    if key.op not in GEMM_OPS or key.dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"{where}: op must be one of {', '.join(GEMM_OPS)} and dtype float16/bfloat16/float32")
    tiles = {name: item[name] for name in TILE_KEYS}
    for name, value in tiles.items():
        lo = 16 if name.startswith("BLOCK") else 1
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < lo
            or (name != "num_stages" and value & (value - 1))
        ):
            raise ValueError(
                f"{where}: {name} must be {'a power of two' if name != 'num_stages' else 'an int'} "
                f">= {lo}, got {value!r}"
            )
    split = item.get("split_k", 1)
    if not isinstance(split, int) or isinstance(split, bool) or not 1 <= split <= 64:
        raise ValueError(f"{where}: split_k must be an int from 1 to 64, got {split!r}")
    if split > 1 and (key.op, key.variant) not in SPLIT_K_VARIANTS:
        ops = ", ".join(f"{op} {variant}" for op, variant in sorted(SPLIT_K_VARIANTS))
        raise ValueError(f"{where}: split_k {split}: only {ops} split K")
    return key, {**tiles, "SPLIT_K": split} if split > 1 else tiles


def load_tuned_table(path) -> TunedTable:
    """Read and check a tuned table; ValueError naming the file and entry when it is malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tuned table {path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != TUNED_FORMAT or data.get("version") != TUNED_VERSION:
        raise ValueError(f"tuned table {path}: not a {TUNED_FORMAT} version {TUNED_VERSION} file")
    if not isinstance(data.get("entries"), list):
        raise ValueError(f"tuned table {path}: 'entries' must be a list")
    entries = {}
    for i, item in enumerate(data["entries"]):
        key, tiles = _entry(item, f"tuned table {path}, entry {i}")
        if key in entries:
            raise ValueError(f"tuned table {path}, entry {i}: a second entry for the same layer")
        entries[key] = tiles
    return TunedTable(entries, path)


def tuned_table_json(gpu_name: str, triton_version: str, entries: dict) -> str:
    """A tuned table's text for {LayerKey: tiles} (what a tune command writes)."""
    rows = [
        {**asdict(key), **{k: tiles[k] for k in TILE_KEYS}, "split_k": tiles.get("SPLIT_K", 1)}
        for key, tiles in entries.items()
    ]
    major_minor = ".".join(triton_version.split("+")[0].split(".")[:2])
    doc = {"format": TUNED_FORMAT, "version": TUNED_VERSION, "gpu": gpu_name, "triton": major_minor, "entries": rows}
    return json.dumps(doc, indent=1) + "\n"
