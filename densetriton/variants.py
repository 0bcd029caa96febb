"""Which kernel variant runs each op: DENSETRITON_KERNELS, read once when an engine is created.

    (unset)                                      each op's default: stem v2, every other op v1
    DENSETRITON_KERNELS=v1                       v1 for every op (the stem's old kernel included)
    DENSETRITON_KERNELS=v2                       v2 for every op that has one, v1 for the rest
    DENSETRITON_KERNELS=conv1x1=v2,conv3x3=v2    per op; ops not named keep their default
    DENSETRITON_KERNELS=v2,conv3x3=v1            a variant for all, then per-op exceptions
    DENSETRITON_KERNELS=v2-pdl                   the dense layers' v2 with programmatic dependent
                                                 launch (a GPU launch attribute; v2 in the interpreter)

Ops: stem (the first convolution), conv1x1 (dense layers' bottleneck), conv3x3 (dense layers'
3x3, and plain layers' only conv), transition, max_pool, head, classifier. An engine reads the
variable when it is created and keeps its choice: setting it later changes only engines created
later, so plans of different selections never share a cache.

A variant becomes an op's default only once a GPU has timed it faster and the whole suite passes
with it (bench/NOTES.md keeps the measurements): so far the stem's v2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_VAR = "DENSETRITON_KERNELS"
# The variants each op has; the first is its default.
OP_VARIANTS = {
    "stem": ("v2", "v1"),
    "conv1x1": ("v1", "v2", "v2-pdl"),
    "conv3x3": ("v1", "v2", "v2-pdl"),
    "transition": ("v1",),
    "max_pool": ("v1",),
    "head": ("v1",),
    "classifier": ("v1", "v2"),
}


@dataclass(frozen=True)
class KernelChoice:
    """The variant of every op (a sorted tuple of (op, variant) pairs, so it can key a cache)."""

    variants: tuple = tuple((op, names[0]) for op, names in sorted(OP_VARIANTS.items()))

    def of(self, op: str) -> str:
        return dict(self.variants)[op]

    def describe(self) -> str:
        """The non-default choices, as DENSETRITON_KERNELS would name them ("default" when none)."""
        changed = [f"{op}={v}" for op, v in self.variants if v != OP_VARIANTS[op][0]]
        return ",".join(changed) or "default"


def _usage() -> str:
    ops = "; ".join(f"{op}: {'/'.join(names)}" for op, names in OP_VARIANTS.items())
    every = sorted({v for names in OP_VARIANTS.values() for v in names})
    return f"give a variant for all ops ({', '.join(every)}) and/or OP=VARIANT pairs, comma-separated ({ops})"


def parse_kernel_choice(text: str | None) -> KernelChoice:
    """DENSETRITON_KERNELS's syntax (see the module docstring) -> KernelChoice; ValueError if bad."""
    chosen = {op: names[0] for op, names in OP_VARIANTS.items()}
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    bare = [item for item in items if "=" not in item]
    if len(bare) > 1:
        raise ValueError(f"{ENV_VAR}={text!r}: more than one variant for all ops; {_usage()}")
    for variant in bare:
        if not any(variant in names for names in OP_VARIANTS.values()):
            raise ValueError(f"{ENV_VAR}={text!r}: no op has a variant {variant!r}; {_usage()}")
        chosen.update({op: variant for op, names in OP_VARIANTS.items() if variant in names})
    seen = set()
    for item in items:
        if "=" not in item:
            continue
        op, _, variant = (part.strip() for part in item.partition("="))
        if op not in OP_VARIANTS or variant not in OP_VARIANTS[op] or op in seen:
            why = (
                "unknown op"
                if op not in OP_VARIANTS
                else "named twice"
                if op in seen
                else f"{op} has no variant {variant!r}"
            )
            raise ValueError(f"{ENV_VAR}={text!r}: {why} in {item!r}; {_usage()}")
        seen.add(op)
        chosen[op] = variant
    return KernelChoice(tuple(sorted(chosen.items())))


def kernel_choice_from_env(environ=None) -> KernelChoice:
    return parse_kernel_choice((os.environ if environ is None else environ).get(ENV_VAR))
