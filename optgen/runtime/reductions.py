"""The step's first phase: optimizer-wide reductions the same step consumes (``reductions:``).

:func:`compute` runs before any parameter is stepped, over every parameter with a gradient of
every param group (those its ``select`` condition admits), and returns one 0-d device tensor per
reduction; every backend's update then reads them (the reference interpreter and the torch code
as tensors, the triton kernels from one float32 device vector). Nothing here syncs with the host:
``k`` and ``q`` are host expressions of hyperparameters, globals and the element count.

The combinations are torch's own, so a spec can reproduce published code that calls them:
``norm`` is ``torch.nn.utils.get_total_norm`` of the per-parameter values (``_foreach_norm`` per
device and dtype, then the norm of the stacked norms: ``clip_grad_norm_``'s total), ``sum`` /
``max`` / ``min`` reduce each tensor and then the stacked per-tensor results (in parameter order),
``kthvalue`` and ``quantile`` are ``torch.kthvalue`` / ``torch.quantile`` of the concatenation of
the flattened per-element values (parameter order).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer  # a GeneratedOptimizer: base.py imports this module, not the reverse

from optgen.backends import reference
from optgen.ir.nodes import Program, ReductionDecl
from optgen.ir.ops import Op
from optgen.numerics.host import HostContext, evaluate
from optgen.numerics.matrix_view import view_shape
from optgen.runtime import sharding


def compute(opt: Optimizer, stepped: list[tuple[int, dict[str, Any], list[torch.Tensor]]],
            phase: str = "first") -> dict[str, torch.Tensor]:
    """The program's reductions of ``phase`` over ``stepped`` ((group index, group, parameters with
    gradients)), in declaration order (a later one may read an earlier one). The ``post`` phase's
    run after every parameter's update and also see the first phase's values."""
    prog: Program = opt._program
    out: dict[str, torch.Tensor] = dict(opt.__dict__.get("_reduced", {})) if phase == "post" else {}
    if not any(r.phase == phase for r in prog.reductions):
        return out
    params = [(opt._stepping_group(gi, g), p) for gi, g, ps in stepped for p in ps]
    if any(sharding.is_dtensor(p) for _, p in params):  # before any reduction mixes local and whole tensors
        raise sharding.refuse_reductions(prog.class_name)
    first = dict(opt.param_groups[0]) if opt.param_groups else {}
    # optimizer-wide hyperparameters (per_group: false) are attributes of the optimizer
    first.update({n: getattr(opt, n) for n, h in prog.hypers if not h.per_group and hasattr(opt, n)})
    whole = HostContext(first, torch.empty(0), {}, tensor_math=False)
    device = params[0][1].device if params else torch.device("cpu")
    for r in prog.reductions:
        if r.phase != phase or r.cond is not None and not evaluate(r.cond, whole):
            continue
        if r.window is not None:  # a statistic of earlier steps' values: no pass over the parameters
            out[r.name] = _window_statistic(opt, r, whole, device)
            continue
        values = []
        for group, p in params:
            state = opt.state[p]
            view = view_shape(prog, p, group, state)
            if r.select is not None and not evaluate(r.select, HostContext(group, p, state, False, view)):
                continue
            values.append(_value(prog, r, p, group, state, view, opt, out))
        out[r.name] = combine(r, values, whole, device)
    if phase == "first":
        _extend_histories(opt, out, whole, device)
    return out


def post_update(opt: Optimizer, stepped: list[tuple[int, dict[str, Any], list[torch.Tensor]]]) -> None:
    """The program's post-update phase (``Program.post``): its ``phase: post`` reductions over the
    updated parameters and states, then its statements for every stepped parameter. Torch ops on
    the device on every backend (the reference interpreter, as for the reductions phase); states
    are written in place, so the triton backend's tables stay valid."""
    prog: Program = opt._program
    reduced = compute(opt, stepped, phase="post")
    post = prog.copy(body=prog.post)
    for gi, group, params in stepped:
        g = opt._stepping_group(gi, group)
        for p in params:
            reference.run(post, p, p.grad, opt.state[p], g, opt._inputs(p), reduced=reduced)


#: the prefix of the ``optimizer.state`` keys that hold the histories window statistics read
#: (string keys, as torch.optim keeps optimizer-wide entries): ``HISTORY + name`` -> {"values", "count"}
HISTORY = "history."


def _windows(prog: Program, whole: HostContext) -> dict[str, int]:
    """The reductions whose values a window statistic reads, each with the longest window read."""
    sizes: dict[str, int] = {}
    for r in prog.reductions:
        if r.window is not None:
            size = evaluate(r.window, whole)
            if int(size) != size or size < 1:
                raise ValueError(f"reduction '{r.name}': its window is {size!r} steps: a positive whole number")
            sizes[r.of.attr] = max(sizes.get(r.of.attr, 0), int(size))
    return sizes


def _history(opt: Optimizer, name: str, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The values (float64, oldest first, the last ``count`` of them valid) of reduction ``name``;
    created empty, moved to ``device`` and resized to ``size`` (the newest kept) where needed."""
    h = opt.state.get(HISTORY + name)
    if h is None:
        h = {"values": torch.zeros(size, dtype=torch.float64, device=device),
             "count": torch.zeros((), dtype=torch.int64, device=device)}
    else:
        h = {k: v.to(device) for k, v in h.items()}
        old = h["values"]
        if old.numel() != size:
            keep = old[max(0, old.numel() - size):]
            h["values"] = torch.cat([torch.zeros(size - keep.numel(), dtype=torch.float64, device=device), keep])
            h["count"] = h["count"].clamp(max=keep.numel())
    return h


def _window_statistic(opt: Optimizer, r: ReductionDecl, whole: HostContext,
                      device: torch.device) -> torch.Tensor:
    """``r.over`` of the valid values among the last ``window`` of its reduction's history (float64,
    on the device, no host sync): mean and std (population) NaN, max -inf, min +inf when empty."""
    size = int(evaluate(r.window, whole))
    h = _history(opt, r.of.attr, _windows(opt._program, whole)[r.of.attr], device)
    values = h["values"][-size:]
    n = h["count"].clamp(max=size)
    valid = torch.arange(size, device=device) >= size - n
    count = n.to(torch.float64)
    if r.over == "count":
        return count
    if r.over == "max":
        return torch.where(valid, values, -math.inf).amax()
    if r.over == "min":
        return torch.where(valid, values, math.inf).amin()
    total = torch.where(valid, values, 0.0).sum()
    if r.over == "sum":
        return total
    mean = total / count
    if r.over == "mean":
        return mean
    return (torch.where(valid, values - mean, 0.0).square().sum() / count).sqrt()  # std (ddof 0)


def _extend_histories(opt: Optimizer, out: dict[str, torch.Tensor], whole: HostContext,
                      device: torch.device) -> None:
    """Append this step's value of every reduction a window reads, if it is finite (on the device:
    the append is a select, not a host decision). New tensors, never in place: a loaded state
    dict's entries (torch.optim keeps them as they are) stay the loader's."""
    for name, size in _windows(opt._program, whole).items():
        if name not in out:  # not computed this step (its if: was false)
            continue
        h = _history(opt, name, size, device)
        v = out[name].to(device=device, dtype=torch.float64).reshape(1)
        finite = torch.isfinite(v)
        h = {"values": torch.where(finite, torch.cat([h["values"][1:], v]), h["values"]),
             "count": h["count"] + finite.reshape(()).to(torch.int64)}
        opt.state[HISTORY + name] = h


def _value(prog: Program, r: ReductionDecl, p: torch.Tensor, group: dict, state: dict, view: Any,
           opt: Optimizer, done: dict[str, torch.Tensor]) -> torch.Tensor:
    if r.of.op == Op.VAR and r.of.attr == "grad":
        return p.grad  # read as it is: no copy
    frame = reference._Frame(prog, p, p.grad, state, group, view)
    frame.host.inputs = opt._inputs(p)
    frame.reduced = done
    return reference._eval(r.of, frame)


def combine(r: ReductionDecl, values: list[torch.Tensor], ctx: HostContext, device: torch.device) -> torch.Tensor:
    """Reduce the per-parameter values of ``r`` (torch's ops; see the module docstring)."""
    over = r.over
    if over == "norm":
        order = float(evaluate(r.order, ctx)) if r.order is not None else 2.0
        return torch.nn.utils.get_total_norm(values, order, False, None).to(device)
    if over == "sum":
        if not values:
            return torch.zeros((), device=device)
        return torch.stack([v.sum().to(device) for v in values]).sum()
    if over in ("max", "min"):
        parts = [(v.amax() if over == "max" else v.amin()).to(device) for v in values if v.numel()]
        if not parts:
            return torch.tensor(-math.inf if over == "max" else math.inf, device=device)
        stacked = torch.stack(parts)
        return stacked.amax() if over == "max" else stacked.amin()
    flat = torch.cat([v.reshape(-1).to(device) for v in values]) if values else torch.zeros(0, device=device)
    ctx.env["count"] = flat.numel()
    if over == "kthvalue":
        k = evaluate(r.k, ctx)
        if k < 1:
            return torch.tensor(-math.inf, dtype=flat.dtype, device=device)
        if k > flat.numel():
            return torch.tensor(math.inf, dtype=flat.dtype, device=device)
        return torch.kthvalue(flat, int(k)).values
    if over == "quantile":
        return torch.quantile(flat, float(evaluate(r.q, ctx)))
    raise ValueError(f"unknown reduction {over!r}")  # pragma: no cover - the spec model restricts it


def refuse_partial(opt: Optimizer) -> None:
    """A step of some parameters only (``step_parameter``, the fused backward pass) cannot compute
    reductions over all of them."""
    if opt._program.reductions or opt._program.post:
        names = ", ".join(r.name for r in opt._program.reductions) or "a post-update phase"
        raise RuntimeError(f"{type(opt).__name__}: its optimizer-wide reductions ({names}) reduce over every "
                           "parameter before the step: call step(), not step_parameter() or attach_fused_backward()")
