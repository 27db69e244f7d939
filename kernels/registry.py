"""Kernel registry: which implementation of an op runs on which device, dtype and shape.

What it is: a table of implementations per public op. Each implementation names its
backend (`reference`, `triton`, `cuda`), a priority, and its requirements (device types,
CUDA arch range, dtypes, and an optional shape predicate that returns the reason it refuses).
`select()` takes the highest-priority implementation whose requirements hold; an override
(`TSCOMPILE_KERNELS="op=backend"` or `"*=backend"`) forces one, and a forced backend that
cannot run is an error (no silent fallback hides a broken fast path), and a CUDA run that
lands on `reference` for an op with a GPU backend warns once per op, naming why. `explain()`
prints, for every candidate, why it was taken or refused. Every selection is recorded
(`selections()`): tsrun logs them at start-up and benchmarks write them into their results.

Also here: `kernel_op`, the decorator that defines a public op as a `torch.library` custom
op and keeps its plain Python body callable (`direct_ops()`): tracing, export and
`torch.compile` see one opaque op, while the eager runtime calls the body itself, because the
custom-op wrapper's host time per call made up most of a small model's eager decode step
(benchmarks/results/decode_step/README.md, the Qwen3-0.6B section).

What it is not: the op definitions (the per-family files, e.g. `kernels/norm.py`), nor any
kernel code.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Callable

import torch

from tscompile import envs

log = logging.getLogger("tscompile.kernels")

Arch = tuple[int, int]  # CUDA compute capability, e.g. (9, 0) for Hopper


@dataclass(frozen=True, slots=True)
class Query:
    """What an implementation is asked to run on: the first tensor's device and dtype,
    plus op-specific shape facts (e.g. `head_dim=128`) as keyword pairs."""

    device: torch.device
    dtype: torch.dtype
    shape: tuple[tuple[str, int], ...] = ()

    @property
    def arch(self) -> Arch | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.get_device_capability(self.device)

    def get(self, key: str) -> int | None:
        return dict(self.shape).get(key)


@dataclass(frozen=True, slots=True)
class Requirements:
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    min_arch: Arch | None = None
    max_arch: Arch | None = None
    dtypes: frozenset[torch.dtype] | None = None  # None: any dtype
    # Returns None when the shape is supported, else the reason it is not.
    shape_check: Callable[[Query], str | None] | None = None
    available: Callable[[], str | None] | None = None  # e.g. "triton not importable"

    def refuse(self, q: Query) -> str | None:
        """The reason this implementation cannot run `q`, or None if it can."""
        if self.available is not None and (why := self.available()) is not None:
            return why
        if q.device.type not in self.devices:
            return f"device {q.device.type} not in {sorted(self.devices)}"
        arch = q.arch if self.min_arch is not None or self.max_arch is not None else None
        if self.min_arch is not None and (arch is None or arch < self.min_arch):
            return f"arch {arch} below sm_{self.min_arch[0]}{self.min_arch[1]}"
        if self.max_arch is not None and (arch is None or arch > self.max_arch):
            return f"arch {arch} above sm_{self.max_arch[0]}{self.max_arch[1]}"
        if self.dtypes is not None and q.dtype not in self.dtypes:
            return f"dtype {q.dtype} not in {sorted(str(d) for d in self.dtypes)}"
        if self.shape_check is not None and (why := self.shape_check(q)) is not None:
            return why
        return None


@dataclass(frozen=True, slots=True)
class Impl:
    op: str
    backend: str
    fn: Callable
    priority: int
    requires: Requirements


@dataclass
class Registry:
    _impls: dict[str, list[Impl]] = field(default_factory=dict)
    _chosen: dict[tuple[str, str, str], str] = field(default_factory=dict)
    # select() results by (op, query, TSCOMPILE_KERNELS as set): a selection is a pure
    # function of those (requirements read only the query), and the eager runtime asks the
    # same questions every step (uncached, select() showed in the eager step's profile:
    # benchmarks/results/decode_step/h100_qwen3-0.6b_customops_profile_b1_eager.txt).
    # Errors are not kept.
    _cache: dict[tuple[str, Query, str], Impl] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)     # ops warned about a reference fallback

    def register(self, op: str, backend: str, *, priority: int = 0,
                 requires: Requirements | None = None) -> Callable[[Callable], Callable]:
        """Decorator: `@registry.register("rms_norm", "reference")`."""

        def deco(fn: Callable) -> Callable:
            impls = self._impls.setdefault(op, [])
            if any(i.backend == backend for i in impls):
                raise ValueError(f"kernel {op!r} already has a {backend!r} implementation")
            impls.append(Impl(op, backend, fn, priority, requires or Requirements()))
            impls.sort(key=lambda i: -i.priority)
            self._cache.clear()
            return fn

        return deco

    def ops(self) -> list[str]:
        return sorted(self._impls)

    def impls(self, op: str) -> list[Impl]:
        if op not in self._impls:
            raise KeyError(f"unknown kernel op {op!r}; known: {', '.join(self.ops())}")
        return list(self._impls[op])

    def _forced(self, op: str) -> str | None:
        overrides = envs.TSCOMPILE_KERNELS.get()
        return overrides.get(op, overrides.get("*"))

    def select(self, op: str, q: Query) -> Impl:
        key = (op, q, envs.TSCOMPILE_KERNELS.raw())
        impl = self._cache.get(key)
        if impl is None:
            impl = self._cache[key] = self._select(op, q)
        return self._record(op, q, impl)

    def _select(self, op: str, q: Query) -> Impl:
        impls = self.impls(op)
        forced = self._forced(op)
        if forced is not None:
            match = [i for i in impls if i.backend == forced]
            if not match:
                raise RuntimeError(
                    f"TSCOMPILE_KERNELS forces {op}={forced}, but {op} has no {forced!r} "
                    f"backend; available: {', '.join(i.backend for i in impls)}")
            if (why := match[0].requires.refuse(q)) is not None:
                raise RuntimeError(f"TSCOMPILE_KERNELS forces {op}={forced}, which cannot run "
                                   f"here: {why}")
            return match[0]
        for impl in impls:
            if impl.requires.refuse(q) is None:
                return impl
        raise RuntimeError(f"no implementation of {op} runs on {q}:\n{self.explain(op, q)}")

    def explain(self, op: str, q: Query) -> str:
        """One line per candidate, best first: taken, or refused and why."""
        forced = self._forced(op)
        lines, taken = [], False
        for impl in self.impls(op):
            why = impl.requires.refuse(q)
            if forced is not None and impl.backend != forced:
                why = why or f"not the forced backend {forced!r}"
            if why is None and not taken:
                taken = True
                lines.append(f"  {op}/{impl.backend} (priority {impl.priority}): taken")
            elif why is None:
                lines.append(f"  {op}/{impl.backend} (priority {impl.priority}): "
                             "eligible, lower priority")
            else:
                lines.append(f"  {op}/{impl.backend} (priority {impl.priority}): refused, {why}")
        return "\n".join(lines)

    def _record(self, op: str, q: Query, impl: Impl) -> Impl:
        key = (op, q.device.type, str(q.dtype).removeprefix("torch."))
        if self._chosen.get(key) != impl.backend:
            self._chosen[key] = impl.backend
            level = logging.INFO if envs.TSCOMPILE_LOG_KERNELS.get() else logging.DEBUG
            log.log(level, "kernel %s on %s/%s -> %s", op, key[1], key[2], impl.backend)
            if (why := self.fallback_reason(op, q, impl)) is not None and op not in self._warned:
                self._warned.add(op)
                log.warning("kernel %s on %s/%s runs the reference implementation (slow): %s",
                            op, key[1], key[2], why)
        return impl

    def fallback_reason(self, op: str, q: Query, impl: Impl) -> str | None:
        """Why a CUDA run of `op` took `reference` although the op has a GPU backend, or
        None when it did not (CPU runs, and ops whose reference is their only
        implementation, such as the collectives, are no fallback)."""
        if q.device.type != "cuda" or impl.backend != "reference":
            return None
        others = [i for i in self.impls(op) if i.backend != "reference"]
        if not others:
            return None
        if self._forced(op) == "reference":
            return f"forced by TSCOMPILE_KERNELS={envs.TSCOMPILE_KERNELS.raw()!r}"
        return "; ".join(f"{i.backend} refused: {i.requires.refuse(q) or 'lower priority'}"
                         for i in others)

    def selections(self) -> dict[str, str]:
        """{"op@device/dtype": backend} for every selection made so far (run metadata)."""
        return {f"{op}@{dev}/{dt}": b for (op, dev, dt), b in sorted(self._chosen.items())}


REGISTRY = Registry()
register = REGISTRY.register


def dispatch(op: str, *args, **shape: int):
    """Select the implementation for the first tensor argument and call it."""
    first = next(a for a in args if isinstance(a, torch.Tensor))
    impl = REGISTRY.select(op, Query(first.device, first.dtype, tuple(sorted(shape.items()))))
    return impl.fn(*args)


_DIRECT: dict[str, Callable] = {}


def kernel_op(name: str, *, mutates_args: tuple[str, ...] = ()) -> Callable:
    """`torch.library.custom_op("tscompile::<name>")` that also records the undecorated
    function for `direct_ops()`."""
    def deco(fn: Callable) -> Callable:
        _DIRECT[name] = fn
        return torch.library.custom_op(f"tscompile::{name}", mutates_args=mutates_args)(fn)
    return deco


def direct_ops() -> types.SimpleNamespace:
    """Every public op's plain Python body by name (`ops.rms_norm(x, w, eps)`): what the
    generated program calls when the runtime executes it eagerly or captures it in a CUDA
    graph. Same arguments, results and in-place writes as `torch.ops.tscompile.*`."""
    return types.SimpleNamespace(**_DIRECT)
