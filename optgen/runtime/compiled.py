"""The ``"compiled"`` backend: each bucket's generated step as one inductor graph.

A bucket (parameters of one branch path) is stepped by the generated ``_device_step`` traced
with ``F`` bound to :mod:`optgen.runtime.compiled_ops`; inductor fuses each tensor's chain of ops
into one loop (one pass over memory instead of one per op). Float host values travel in one
float64 tensor ``H`` (a row per name, a column per tensor), so nothing recompiles when a
scheduler moves lr, betas or weight decay; branch decisions and other non-float values are
constants of the graph (the bucket's structure). Each bucket structure gets its own code object,
hence its own dynamo cache entry (no cache-size limit shared between buckets); the compiled
functions are shared by every optimizer of a class. A bucket that fails to compile runs the eager
torch backend, after one warning per optimizer.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

from optgen.runtime import compiled_ops

_FAILED = object()
#: (generated step function, bucket key) -> the compiled bucket function, or _FAILED
_CACHE: dict[tuple, Any] = {}
_rebound: dict[Callable, Callable] = {}
_names = itertools.count()


def cxx_available() -> bool:
    """Whether inductor's CPU code generation has a C++ compiler to call."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def _with_compiled_ops(step: Callable) -> Callable:
    """``step`` with its global ``F`` bound to the per-tensor ops (same code, other globals)."""
    fn = _rebound.get(step)
    if fn is None:
        # a module of its own, importable by name: dynamo resolves an inlined function's globals
        # through its module's ``__name__``, so a bare copy of the globals would read the old F
        name = f"optgen._compiled_.{step.__module__}"
        mod = types.ModuleType(name)
        mod.__dict__.update({k: v for k, v in step.__globals__.items() if k not in ("__name__", "__spec__")})
        mod.F = compiled_ops
        sys.modules[name] = mod
        fn = types.FunctionType(step.__code__, mod.__dict__, step.__name__, step.__defaults__, step.__closure__)
        _rebound[step] = fn
    return fn


def _is_float(v: Any) -> bool:
    return isinstance(v, float) or (isinstance(v, list) and any(isinstance(x, float) for x in v))


def _meta(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device.type)


def _build(step: Callable, consts: tuple, names: tuple[str, ...], n: int, with_acc: bool) -> Callable:
    inner = _with_compiled_ops(step)

    def bucket(H: torch.Tensor, ps: list, grads: list, states: dict, acc: list) -> None:
        h = dict(consts)
        for k, name in enumerate(names):
            h[name] = [H[k, i] for i in range(n)]
        if with_acc:
            inner(h, ps, grads, states, acc)
        else:
            inner(h, ps, grads, states)

    # a code object of its own: dynamo keeps one cache (and one recompile limit) per code object
    code = bucket.__code__.replace(co_name=f"optgen_bucket_{next(_names)}")
    fn = types.FunctionType(code, bucket.__globals__, code.co_name, None, bucket.__closure__)
    return torch.compile(fn, fullgraph=True, dynamic=False)


class CompiledSteps:
    """One optimizer's entry to the compiled bucket functions of its class."""

    def __init__(self, step: Callable, with_acc: bool) -> None:
        self.step = step
        self.with_acc = with_acc
        self.warned = False

    def run(self, h: dict[str, Any], ps: list, grads: list, states: dict[str, list], acc: list) -> bool:
        """Step one bucket compiled; False when it cannot be (the caller then steps it eagerly)."""
        n = len(ps)
        names = tuple(k for k, v in h.items() if _is_float(v))
        consts = tuple((k, v) for k, v in h.items() if k not in names)
        # per-tensor non-float values (bool lists) are constants too: keyed as tuples
        key = (self.step, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in consts), names, n,
               tuple(map(_meta, ps)), tuple(map(_meta, grads)),
               tuple((s, tuple(map(_meta, ts))) for s, ts in states.items()))
        try:
            fn = _CACHE.get(key)
        except TypeError as exc:  # an unhashable host value: not a structure we can key on
            self._warn(exc)
            return False
        if fn is _FAILED:
            self._warn(None)
            return False
        rows = [[float(x) for x in (v if isinstance(v, list) else [v] * n)] for v in (h[k] for k in names)]
        H = torch.tensor(rows, dtype=torch.float64) if rows else torch.zeros(0, n, dtype=torch.float64)
        if fn is None:
            fn = _CACHE[key] = _build(self.step, consts, names, n, self.with_acc)
        try:
            fn(H, ps, grads, states, acc)
        except Exception as exc:  # noqa: BLE001 - any compile failure: the eager step instead
            if not _compile_error(exc):
                raise
            _CACHE[key] = _FAILED
            self._warn(exc)
            return False
        return True

    def _warn(self, exc: BaseException | None) -> None:
        if self.warned:
            return
        self.warned = True
        why = f": {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}" if exc else ""
        warnings.warn(f"backend='compiled': torch.compile could not compile a step of this optimizer{why}; "
                      "those parameters are stepped by the eager torch backend", RuntimeWarning, stacklevel=5)


def _compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from tracing or compiling (dynamo, inductor, the C++ build)."""
    import torch._dynamo.exc as dexc

    return isinstance(exc, (dexc.TorchDynamoException, dexc.BackendCompilerFailed)) or "inductor" in type(exc).__module__
