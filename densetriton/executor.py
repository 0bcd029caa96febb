"""The Triton backend's executor: a plan per input shape, cached, and a call that only launches."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections import OrderedDict
from types import ModuleType

import torch

from .plan import (
    Plan,
    build_stages,
    fold_batchnorm,
    launch_tiles,
    memory_layout,
    plan_split_k_workspace_numel,
    stem_v2_workspace,
)
from .spec import NO_CLASSIFIER, DenseNetSpec
from .tiles import TunedTable, find_tuned_table
from .variants import kernel_choice_from_env

DEFAULT_PLAN_CACHE_BYTES = 4 << 30


def _interpreter_ready(kernels: ModuleType) -> bool:
    """Kernels run on CPU tensors only through Triton's interpreter.

    Triton picks interpreter or compiler per @triton.jit function when it is decorated: its own
    standard library's when triton is imported, ours when densetriton.kernels is. Both must have
    seen TRITON_INTERPRET=1, so setting it after either import is too late.
    """
    import triton.language.standard as standard
    from triton.runtime.jit import JITFunction

    modules = [standard] + [m for name, m in list(sys.modules.items()) if name.startswith(kernels.__name__ + ".")]
    return not any(isinstance(v, JITFunction) for m in modules for v in vars(m).values())


def _triton_version_text() -> str:
    import triton

    return triton.__version__


def _triton_version() -> tuple[int, int]:
    major, minor = (_triton_version_text().split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def tuned_table_for(device: torch.device, kernels: ModuleType) -> TunedTable | None:
    """The tuned tile table for this GPU and triton: the user's cache first, then the package's."""
    from .weights import cache_dir

    package_dir = os.path.join(os.path.dirname(kernels.__file__), "tuned")
    return find_tuned_table(
        torch.cuda.get_device_name(device), _triton_version_text(), [cache_dir() / "tuned", package_dir]
    )


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's caching allocator raises torch.OutOfMemoryError; the CPU allocator, and CUDA errors
    from a library's own allocation, a RuntimeError that says so."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    message = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in message or "out of memory" in message)


class TritonExecutor:
    def __init__(
        self,
        spec: DenseNetSpec,
        tensors: dict,
        *,
        device: torch.device,
        dtype: torch.dtype,
        plan_cache_bytes: int = DEFAULT_PLAN_CACHE_BYTES,
    ):
        try:
            from . import kernels  # fails here, not mid-call, when triton is missing
        except ImportError as e:
            raise RuntimeError(f"backend='triton' needs the triton package ({e}); use backend='reference'") from None
        self.interpreted = device.type != "cuda"
        if self.interpreted and not _interpreter_ready(kernels):
            raise RuntimeError(
                f"backend='triton' on {device} runs the kernels through Triton's interpreter, which must be switched "
                "on before triton is imported: set TRITON_INTERPRET=1 in the environment before Python starts "
                "(or use backend='reference')"
            )
        if self.interpreted and dtype == torch.bfloat16:
            # Seen with triton 3.8.0: the interpreter's tl.dot on bfloat16 operands returns garbage.
            raise ValueError(
                "bfloat16 does not run correctly under Triton's interpreter (its tl.dot on bfloat16 gives wrong "
                "results); on the CPU use dtype=float16 or float32, or backend='reference'"
            )
        if self.interpreted and _triton_version() < (3, 8):
            # Seen with triton 3.6.0 and numpy 2.5: the interpreter fails on a loop whose bound is
            # a kernel argument ("only 0-dimensional arrays can be converted to Python scalars").
            # Compiled kernels on a GPU are not affected.
            raise RuntimeError(
                f"backend='triton' on {device} needs Triton's interpreter from triton 3.8 on (triton "
                f"{_triton_version_text()}'s fails on these kernels): upgrade triton, or use backend='reference'"
            )
        self.spec, self.device, self.dtype = spec, device, dtype
        # Read once, here: every plan of this executor runs the same kernels (ValueError if unknown).
        self.kernel_choice = kernel_choice_from_env()
        self.tuned = None if self.interpreted else tuned_table_for(device, kernels)
        self.stages = build_stages(spec)
        self.folded = fold_batchnorm(tensors, spec, dtype, device)
        # Storage, not numel: packed weights are views with padded rows.
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.folded.values()}
        self.weight_bytes = sum(storages.values())
        self.plans: OrderedDict[tuple, Plan] = OrderedDict()
        self.plan_cache_bytes = plan_cache_bytes
        # On CUDA each plan's forward is captured once in a CUDA graph and replayed
        # (DENSETRITON_CUDA_GRAPHS=0 launches kernel by kernel instead).
        self.use_cuda_graphs = device.type == "cuda" and os.environ.get("DENSETRITON_CUDA_GRAPHS", "1") != "0"
        # One stream of the engine's device for every capture (torch's default capture stream
        # belongs to whichever device captured first; a new pool stream per capture would
        # sooner or later be one another thread launches on).
        self.capture_stream = None

    @property
    def plan_cache_bytes(self) -> int:
        """Bound on the bytes that cached plans hold (the newest plan is kept even if larger)."""
        return self._plan_cache_bytes

    @plan_cache_bytes.setter
    def plan_cache_bytes(self, value: int) -> None:
        self._plan_cache_bytes = int(value)
        self._trim(self._plan_cache_bytes)

    def plan(self, n: int, height: int, width: int) -> Plan:
        """The plan for this input size: reused when cached, else built (and the cache trimmed)."""
        # Kernels queued on different CUDA streams may run at the same time: each stream gets its
        # own plan, so no two calls ever share buffers (one stream runs its kernels in order).
        stream = torch.cuda.current_stream(self.device).stream_id if self.device.type == "cuda" else 0
        key = (n, height, width, stream)
        plan = self.plans.get(key)
        if plan is not None:
            self.plans.move_to_end(key)
            return plan
        # Make room first, so old buffers are free before the new ones are allocated.
        self._trim(budget=self.plan_cache_bytes - self.planned_bytes(n, height, width))
        plan = self._build_plan(n, height, width)
        if plan is None:
            # Retry with every other plan freed; outside the except block, so that the traceback
            # no longer holds the half-built plan's buffers.
            self.release()
            plan = self._build_plan(n, height, width)
        if plan is None:
            raise MemoryError(
                f"out of memory building the plan for batch {n} at {height}x{width}: its buffers need "
                f"{self.planned_bytes(n, height, width) / 2**20:,.0f} MiB on {self.device}; use a smaller batch"
            )
        self.plans[key] = plan
        return plan

    def _build_plan(self, n: int, height: int, width: int) -> Plan | None:
        try:
            return Plan(
                self.spec,
                self.stages,
                self.folded,
                n=n,
                height=height,
                width=width,
                dtype=self.dtype,
                device=self.device,
                interpreted=self.interpreted,
                kernel_choice=self.kernel_choice,
                tuned=self.tuned,
            )
        except RuntimeError as e:  # torch.OutOfMemoryError included
            if not is_out_of_memory(e):
                raise
            return None

    def planned_bytes(self, n: int, height: int, width: int) -> int:
        """Bytes of the buffers and scratch a plan for this size allocates (weights not counted)."""
        _, _, arena_numel, scratch_numel = memory_layout(self.spec, n, height, width)
        stem_numel = 0
        if self.kernel_choice.of("stem") == "v2":
            numel, lent = stem_v2_workspace(self.spec, self.stages[0], n, height, width)
            stem_numel = 0 if lent else numel
        choices = dict(dtype=self.dtype, kernel_choice=self.kernel_choice, interpreted=self.interpreted)
        tiles_of = functools.partial(launch_tiles, tuned=self.tuned, **choices)
        float32_numel = n * self.spec.num_features + plan_split_k_workspace_numel(
            self.spec, self.stages, n, height, width, tiles_of
        )
        return (sum(arena_numel) + scratch_numel + stem_numel) * self.dtype.itemsize + float32_numel * 4

    def _trim(self, budget: int) -> None:
        while self.plans and sum(p.nbytes for p in self.plans.values()) > max(budget, 0):
            self.plans.popitem(last=False)

    def release(self) -> None:
        self.plans.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward(self, plan: Plan, x: torch.Tensor, logits: torch.Tensor | None) -> None:
        if self.device.type == "cuda":
            # Triton launches on the current device, which need not be the engine's.
            with torch.cuda.device(self.device):
                self._launch(plan, x, logits)
        else:
            self._launch(plan, x, logits)

    def _launch(self, plan: Plan, x: torch.Tensor, logits: torch.Tensor | None) -> None:
        if self.use_cuda_graphs and plan.graph is None and not plan.graph_failed:
            try:
                if self.capture_stream is None:
                    # From the high-priority pool: torch hands out its default-priority streams
                    # round-robin, so a caller's own torch.cuda.Stream() could otherwise be this one.
                    self.capture_stream = torch.cuda.Stream(self.device, priority=-1)
                plan.capture(x, logits, self.capture_stream)
                return  # capture ran the forward once, eagerly
            except Exception as e:  # launching one by one is slower, never wrong
                plan.graph_failed = True
                warnings.warn(
                    f"CUDA graph capture failed ({e}); this shape launches its kernels one by one", stacklevel=4
                )
        if plan.graph is not None:
            plan.replay(x, logits)
        else:
            plan.run(x, logits)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan(x.shape[0], x.shape[2], x.shape[3])
        self._forward(plan, x, None)
        return plan.features.clone()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spec.num_classes:
            raise ValueError(NO_CLASSIFIER)
        plan = self.plan(x.shape[0], x.shape[2], x.shape[3])
        logits = torch.empty(x.shape[0], self.spec.num_classes, dtype=torch.float32, device=self.device)
        self._forward(plan, x, logits)
        return logits
