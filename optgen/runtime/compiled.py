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

import functools
import itertools
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

from optgen.ir.ops import Op
from optgen.runtime import compiled_ops

_FAILED = object()
#: (generated step function, bucket key) -> the compiled bucket function, or _FAILED
_CACHE: dict[tuple, Any] = {}
_rebound: dict[Callable, Callable] = {}
_names = itertools.count()


@functools.cache
def cxx_available() -> bool:
    """Whether inductor's CPU code generation has a C++ compiler to call (its own toolchain
    search: ``torch._inductor.config.cpp.cxx``, ``$CXX``, then g++/clang++ on the PATH)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return bool(get_cpp_compiler())
    except Exception:  # noqa: BLE001 - InvalidCxxCompiler, or an inductor that cannot be imported
        return False


_warned_no_cxx = False


def warn_no_cxx() -> None:
    """``backend="auto"`` on CPU without a C++ compiler: one warning per process."""
    global _warned_no_cxx
    if not _warned_no_cxx:
        _warned_no_cxx = True
        warnings.warn("backend='auto': no C++ compiler found for torch.compile's CPU code generation "
                      "(inductor looks for $CXX, g++ or clang++), so the optimizer steps with the eager torch "
                      "backend (several memory passes per step instead of one); install a compiler for the "
                      "compiled backend, or pass backend='torch' to choose it and silence this warning",
                      RuntimeWarning, stacklevel=4)


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


def _structure(ps: list, states: dict[str, list]) -> tuple:
    """The cheap part of a bucket's tensor structure: shapes, dtype, device, which states exist.
    Strides and the rest are guarded by dynamo itself (a change there recompiles that graph)."""
    p0 = ps[0]
    return (tuple(p.shape for p in ps), p0.dtype, p0.device,
            tuple((s, tuple(t is None for t in ts)) for s, ts in states.items()))


def _build(step: Callable, consts: tuple, names: tuple[str, ...], per: tuple[bool, ...], n: int,
           with_acc: bool) -> Callable:
    inner = _with_compiled_ops(step)
    offsets = list(itertools.accumulate((n if p else 1 for p in per), initial=0))

    def bucket(H: torch.Tensor, ps: list, grads: list, states: dict, acc: list) -> None:
        h = dict(consts)
        for name, p, k in zip(names, per, offsets):
            h[name] = [H[k + i] for i in range(n)] if p else H[k]
        if with_acc:
            inner(h, ps, grads, states, acc)
        else:
            inner(h, ps, grads, states)

    # a code object of its own: dynamo keeps one cache (and one recompile limit) per code object
    code = bucket.__code__.replace(co_name=f"optgen_bucket_{next(_names)}")
    fn = types.FunctionType(code, bucket.__globals__, code.co_name, None, bucket.__closure__)
    return torch.compile(fn, fullgraph=True, dynamic=False)


def number_args(program: Any) -> frozenset[str]:
    """Host values that ops take as Python numbers (the orthogonalisers' steps and coefficients:
    ``addmm``'s ``beta``/``alpha``): constants of the graph, not entries of ``H``. They are
    hyperparameters a scheduler does not move; a new value compiles a new graph."""
    from optgen.ir.nodes import Assign, walk_nodes, walk_stmts
    from optgen.ir.ops import CALLS

    return frozenset(a.attr for s in walk_stmts(program.body) if isinstance(s, Assign)
                     for n in walk_nodes(s.value) if n.op in CALLS
                     for a in n.args[1:] if a.op == Op.VAR and a.is_host)


class CompiledSteps:
    """One optimizer's entry to the compiled bucket functions of its class."""

    def __init__(self, step: Callable, with_acc: bool, numbers: frozenset[str] = frozenset()) -> None:
        self.step = step
        self.with_acc = with_acc
        self.numbers = numbers
        self.warned = False

    def run(self, h: dict[str, Any], ps: list, grads: list, states: dict[str, list], acc: list) -> bool:
        """Step one bucket compiled; False when it cannot be (the caller then steps it eagerly)."""
        n = len(ps)
        names = tuple(k for k, v in h.items() if _is_float(v) and k not in self.numbers)
        consts = tuple((k, v) for k, v in h.items() if k not in names)
        per = tuple(isinstance(h[k], list) for k in names)  # per-tensor values, or one for all
        # per-tensor non-float values (bool lists) are constants too: keyed as tuples. The thread
        # count is part of the structure: inductor specialises its C++ loops on it (OpenMP or not)
        key = (self.step, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in consts), names, per, n,
               torch.get_num_threads(), _structure(ps, states))
        try:
            fn = _CACHE.get(key)
        except TypeError as exc:  # an unhashable host value: not a structure we can key on
            self._warn(exc)
            return False
        if fn is _FAILED:
            self._warn(None)
            return False
        flat: list[float] = []
        for k, p in zip(names, per):
            v = h[k]
            if p:
                flat.extend(map(float, v))
            else:
                flat.append(float(v))
        H = torch.tensor(flat, dtype=torch.float64)
        if fn is None:
            fn = _CACHE[key] = _build(self.step, consts, names, per, n, self.with_acc)
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
