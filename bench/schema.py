"""JSON Schema (draft 2020-12) of a results file, as `densetriton bench` writes it.

The fields issue 4 names are required; extras are documented here and allowed, so a newer bench
can add fields without breaking readers.
"""

# Every peer the bench can run, in the order (bench/peers.py builds them; the CLI and this
# schema read the names from here, without importing torch).
PEER_IDS = (
    "densetriton",
    "torchvision-eager-fp32",
    "torchvision-eager-fp16-cl",
    "torch-compile-default",
    "torch-compile-reduce-overhead",
    "torch-compile-max-autotune",
    "onnxruntime",
)

# The record fields issue 4 names, in its order (the report writes them first, extras after, the
# raw times last), and a results file's top-level fields.
RECORD_FIELDS = (
    "model",
    "batch",
    "dtype",
    "image_size",
    "peer",
    "median_ms",
    "p90_ms",
    "images_per_s",
    "peak_mem_bytes",
    "cold_start_s",
    "max_rel_err",
    "top1_agree",
    "floor_ms",
)
TOP_FIELDS = ("device", "torch", "triton", "torchvision", "commit", "created", "results")

_num = {"type": "number"}
_count = {"type": "integer", "minimum": 0}
_pos = {"type": "number", "exclusiveMinimum": 0}
_opt_str = {"type": ["string", "null"]}
DTYPE = {"enum": ["float16", "bfloat16", "float32"]}
PEER = {"enum": list(PEER_IDS)}

RECORD = {
    "type": "object",
    "required": [*RECORD_FIELDS, "times_ms"],
    "properties": {
        "model": {"type": "string"},
        "batch": {"type": "integer", "minimum": 1},
        "dtype": DTYPE,  # the run's dtype (the --dtype axis)
        "image_size": {"type": "integer", "minimum": 1},
        "peer": PEER,
        "median_ms": _pos,
        "p90_ms": _pos,
        "images_per_s": _pos,
        "peak_mem_bytes": {"type": "integer"},
        "cold_start_s": _pos,
        "max_rel_err": {"type": ["number", "null"], "minimum": 0},  # null: non-finite logits
        "top1_agree": {"type": "number", "minimum": 0, "maximum": 1},
        "floor_ms": _pos,
        "times_ms": {"type": "array", "items": _pos, "minItems": 1},
        # extras
        "pct_of_floor": _pos,
        "backend": {"enum": ["triton", "reference", None]},
        "peer_dtype": DTYPE,  # what the peer computed in
        "peak_mem_kind": {"enum": ["cuda_max_allocated", "cpu_rss_peak", "cpu_maxrss_growth"]},
        "planned_mem_bytes": {"type": ["integer", "null"]},
        # densetriton on the Triton backend: ms per layer kind of one forward, and how they were
        # taken (bench/layer_times.py): "graph" (one CUDA graph, timing events between kinds),
        # "ablation" (the whole graph less a graph without the kind), "kind-graphs" (a graph per run
        # of one kind), "launches" (an event pair per launch, no graph)
        "kinds_ms": {"type": ["object", "null"], "additionalProperties": {"type": "number", "minimum": 0}},
        "kinds_method": {"enum": ["graph", "ablation", "kind-graphs", "launches", None]},
        "peer_detail": _opt_str,  # e.g. the onnxruntime peer's execution provider
        "accuracy_images": {"type": "integer", "minimum": 1},
        "repeats": {"type": "integer", "minimum": 1},
        "wall_s": _num,
    },
}

SKIPPED = {
    "type": "object",
    "required": ["peer", "reason"],
    "properties": {
        "peer": PEER,
        "reason": {"type": "string", "minLength": 1},
        "model": {"type": "string"},
        "batch": {"type": "integer"},
        "dtype": DTYPE,
        "image_size": {"type": "integer"},
        # a record interrupted while it ran: the seconds it had used (a compile that never finished)
        "elapsed_s": {"type": "number", "minimum": 0},
    },
}

KIND = {
    "type": "object",
    "required": ["macs", "bytes", "bytes_layerwise", "floor_ms"],
    "properties": {"macs": _count, "bytes": _count, "bytes_layerwise": _count, "floor_ms": _num},
}

ROOFLINE = {
    "type": "object",
    "required": [
        "model",
        "batch",
        "dtype",
        "image_size",
        "macs",
        "bytes",
        "bytes_layerwise",
        "compute_ms",
        "memory_ms",
        "floor_ms",
        "kinds",
    ],
    "properties": {
        "model": {"type": "string"},
        "batch": {"type": "integer", "minimum": 1},
        "dtype": DTYPE,
        "image_size": {"type": "integer"},
        "macs": _count,
        "macs_unpooled": _count,
        "bytes": _count,
        "bytes_layerwise": _count,
        "compute_ms": _num,
        "memory_ms": _num,
        "floor_ms": _pos,
        "floor_layerwise_ms": _num,
        "kinds": {"type": "object", "additionalProperties": KIND},
    },
}

RESULTS = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "densetriton bench results",
    "type": "object",
    "required": list(TOP_FIELDS),
    "properties": {
        "schema_version": {"const": 1},
        "device": {"type": "string", "minLength": 1},
        "device_detail": {"type": "string"},
        "torch": {"type": "string"},
        "triton": _opt_str,
        "torchvision": _opt_str,
        "python": {"type": "string"},
        "commit": {"type": ["string", "null"], "pattern": "^[0-9a-f]{40}$"},
        "commit_dirty": {"type": ["boolean", "null"]},
        "created": {"type": "string", "format": "date-time"},
        "settings": {"type": "object"},
        "notes": {"type": "array", "items": {"type": "string"}},
        "weights": {"type": "object", "additionalProperties": {"type": "string"}},
        "machine": {
            "type": "object",
            "properties": {
                "copy_bytes_per_s": _pos,
                "matmul_flops_per_s": {"type": "object", "additionalProperties": _pos},
            },
        },
        "roofline": {"type": "array", "items": ROOFLINE},
        "results": {"type": "array", "items": RECORD},
        "skipped": {"type": "array", "items": SKIPPED},
        "complete": {"type": "boolean"},
        "wall_s": _num,
    },
}
