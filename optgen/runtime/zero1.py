"""ZeRO-1 through ``torch.distributed.optim.ZeroRedundancyOptimizer`` wrapping a generated class.

``ZeroRedundancyOptimizer(params, optimizer_class=<generated class>, **hyperparameters)`` gives
each rank a local generated optimizer over the whole parameters it owns (ZeRO partitions by
parameter), steps it on the DDP-averaged gradients and broadcasts each parameter from its owner.
For a spec whose maths is per parameter this is bit-identical to DDP with the unsharded optimizer.
Two things need the generated class's help, both done here when ZeRO constructs it (:func:`attach`,
called from ``GeneratedOptimizer.__init__``):

* Specs whose step reads values pooled over several parameters cannot be partitioned by parameter:
  Prodigy's ``d`` (its ``num``/``den`` sums run over every parameter of the optimizer) and
  Kourkoutas-beta's per-layer norm when one layer's parameters land on different ranks. Those are
  refused with a NotImplementedError that says why, instead of silently training differently.
* ``ZeroRedundancyOptimizer.load_state_dict`` writes each owned entry of the consolidated state dict
  straight into ``local_optimizer.state[p]``. A spec with a published state-dict layout
  (adv_optm's int ``step`` and ``factored`` flags) saves that layout, so the raw entries are turned
  back into this class's own layout by a step pre-hook before the next step (what the generated
  ``load_state_dict`` does for a one-process load).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

from optgen.runtime import published_layout

if TYPE_CHECKING:
    from optgen.runtime.base import GeneratedOptimizer


def constructing_zero(opt: Any) -> Any:
    """The ``ZeroRedundancyOptimizer`` whose ``_init_local_optimizer`` is constructing ``opt``, or None."""
    zro = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zro is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_init_local_optimizer":
            owner = frame.f_locals.get("self")
            if isinstance(owner, zro.ZeroRedundancyOptimizer):
                return owner
        frame = frame.f_back
    return None


def attach(opt: GeneratedOptimizer) -> None:
    """Called at the end of ``GeneratedOptimizer.__init__``: nothing unless ZeRO is constructing ``opt``."""
    zero = constructing_zero(opt)
    if zero is None:
        return
    refuse_unpartitionable(opt, zero)
    if opt._program.published is not None:
        opt._zero1_adopted = {}
        opt.register_step_pre_hook(lambda o, args, kwargs: adopt_loaded_states(o))


def refuse_unpartitionable(opt: GeneratedOptimizer, zero: Any) -> None:
    """NotImplementedError when partitioning ``zero``'s parameters by rank changes ``opt``'s maths."""
    prog = opt._program
    name = type(opt).__name__
    if zero.world_size > 1 and prog.accumulators:
        sums = ", ".join(a.name for a in prog.accumulators)
        raise NotImplementedError(
            f"{name} under ZeroRedundancyOptimizer ({zero.world_size} ranks): its optimizer-wide values "
            f"({', '.join(g.name for g in prog.globals)}) are updated from sums ({sums}) over every parameter of "
            "the optimizer, and ZeRO gives each rank's local optimizer only the parameters it owns, so every rank "
            "would compute its own d from its shard. Use DDP with the unsharded optimizer instead")
    kourkoutas = getattr(opt, "_kourkoutas", None)
    if kourkoutas is None or zero.world_size == 1:
        return
    ranks: dict[Any, set[int]] = {}
    shapes: dict[Any, tuple[int, ...]] = {}
    default_on = opt.defaults.get("kourkoutas_beta")
    for rank, groups in enumerate(zero._partition_parameters()):
        for group in groups:
            if not group.get("kourkoutas_beta", default_on):
                continue
            for p in group["params"]:
                key = kourkoutas.key_fn(p)
                ranks.setdefault(key, set()).add(rank)
                shapes.setdefault(key, tuple(p.shape))
    split = [key for key, rs in ranks.items() if len(rs) > 1]
    if split:
        raise NotImplementedError(
            f"{name} with kourkoutas_beta under ZeroRedundancyOptimizer ({zero.world_size} ranks): Kourkoutas-beta "
            f"pools the gradient norm of every parameter of a layer (by default every parameter of the same shape), "
            f"and the parameters of {len(split)} layer(s) (the first of shape {shapes[split[0]]}) are owned by "
            "different ranks, which would each pool only their own. Give each parameter its own layer "
            "(layer_key_fn=id, in the unsharded run too), switch kourkoutas_beta off, or use DDP with the "
            "unsharded optimizer")


def _looks_published(opt: GeneratedOptimizer, p: torch.Tensor, st: dict[str, Any]) -> bool:
    prog = opt._program
    lay = prog.published
    declared = {d.name for d in prog.state}
    if any(e.name in st and e.name not in declared for e in lay.state):
        return True
    if lay.master is not None and lay.master in st:
        return True
    if prog.step_store == "tensor" and ("step" in st) != isinstance(st.get("step"), torch.Tensor):
        return True  # a number
    if prog.step_store == "tensor" and lay.step_if is not None and "step" not in st:
        return True
    return any(isinstance(st.get(k), torch.Tensor) and st[k].dim() == 1 and p.dim() != 1 for k in lay.flat)


def adopt_loaded_states(opt: GeneratedOptimizer) -> None:
    """Turn states written into ``opt.state`` directly (``ZeroRedundancyOptimizer.load_state_dict``)
    in the published layout into this class's own, as ``load_state_dict`` would have loaded them.

    Each parameter's state dict is checked once per object: a step sees only the new ones.
    """
    seen = opt._zero1_adopted
    groups = opt.param_groups
    params = [(p, g) for g in groups for p in g["params"]]
    raw = {}
    for i, (p, _) in enumerate(params):
        st = opt.state.get(p)
        if not st or seen.get(p) is st:
            continue
        if _looks_published(opt, p, st):
            raw[i] = st
        else:
            seen[p] = st
    if not raw:
        return
    packed, n = [], 0
    for g in groups:
        packed.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(n, n + len(g["params"])))})
        n += len(g["params"])
    own = published_layout.from_published(opt, {"state": raw, "param_groups": packed})["state"]
    for i in raw:
        p, g = params[i]
        opt.state[p] = opt._loaded_state(i, p, own[i], g)
        seen[p] = opt.state[p]
    triton = opt._triton
    opt._init_transient()  # as __setstate__ after a load: caches keyed by the old states go
    if triton is not None:
        triton.invalidate()
        opt._triton = triton
