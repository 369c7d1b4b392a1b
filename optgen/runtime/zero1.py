"""ZeRO-1 through ``torch.distributed.optim.ZeroRedundancyOptimizer`` wrapping a generated class.

``ZeroRedundancyOptimizer(params, optimizer_class=<generated class>, **hyperparameters)`` gives
each rank a local generated optimizer over the whole parameters it owns (ZeRO partitions by
parameter), steps it on the DDP-averaged gradients and broadcasts each parameter from its owner.
For a spec whose maths is per parameter this is bit-identical to DDP with the unsharded optimizer.
Two things need the generated class's help, both done here when ZeRO constructs it (:func:`attach`,
called from ``GeneratedOptimizer.__init__``):

* Specs whose step pools values over several parameters: Prodigy's ``d`` (its ``num``/``den``
  sums run over every parameter of the optimizer) and Kourkoutas-beta's per-layer gradient norm
  when one layer's parameters land on different ranks. Each rank's contributions (one 0-d value
  per parameter) are gathered at the step's finish (Prodigy) or before the next step's beta2
  (Kourkoutas) and added in the unsharded optimizer's parameter order on every rank: the same
  float32 additions as one process, so bit-identical to DDP with the unsharded optimizer.
* ``ZeroRedundancyOptimizer.load_state_dict`` writes each owned entry of the consolidated state dict
  straight into ``local_optimizer.state[p]``. A spec with a published state-dict layout
  (adv_optm's int ``step`` and ``factored`` flags, torch Adafactor's (R, 1) / (1, C) factors) saves that layout, so the raw entries are turned
  back into this class's own layout by a step pre-hook before the next step (what the generated
  ``load_state_dict`` does for a one-process load).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.optim import Optimizer  # a GeneratedOptimizer: base.py imports this module, not the reverse

from optgen.ir.ops import Op
from optgen.runtime import published_layout


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


def refuse_self_sharded(opt: Optimizer) -> None:
    """Called before the groups are built: a class that shards itself (``Adams_ZeRO`` with a process
    group of several ranks) cannot be ZeroRedundancyOptimizer's local optimizer."""
    if opt._zero is not None and constructing_zero(opt) is not None:
        name = type(opt).__name__
        raise NotImplementedError(
            f"{name} under ZeroRedundancyOptimizer: {name} shards its own state across its process_group "
            f"(adams-torch's ZeRO); wrap Adams (the same maths) in ZeroRedundancyOptimizer, or use {name} alone")


def global_stream_draws(program: Any) -> list[str]:
    """What of ``program`` draws from torch's default generator in parameter order (a state
    initialised by ``random_subset``, a ``rand_like`` in the step)."""
    from optgen.ir.nodes import Assign, walk_nodes, walk_stmts

    found = [f"state {d.name} (random_subset)" for d in program.state
             if isinstance(d.init, tuple) and d.init and d.init[0] == "random_subset"]
    for s in walk_stmts(list(program.body) + list(program.finalize)):
        if isinstance(s, Assign) and any(n.op == Op.RAND_LIKE for n in walk_nodes(s.value)):
            found.append(f"{s.target} = ... rand_like(...)")
    return list(dict.fromkeys(found))


def refuse_partition(opt: Optimizer) -> None:
    """What a partition of the parameters between ranks would silently change: draws from torch's
    default generator in parameter order, and optimizer-wide reductions (each rank would reduce over
    the parameters it owns only)."""
    name = type(opt).__name__
    why = ""
    draws = global_stream_draws(opt._program)
    if draws:
        why = (f"draws from torch's default random generator in parameter order ({', '.join(draws)}), so a rank "
               "owning part of the parameters would draw other values than one process")
    elif opt._program.reductions:
        names = ", ".join(r.name for r in opt._program.reductions)
        why = (f"reduces over every parameter of the optimizer ({names}), and a rank owns only part of them "
               "(optimizer-wide reductions are not pooled between ranks yet)")
    if why:
        raise NotImplementedError(f"{name} under ZeroRedundancyOptimizer: {name} {why}; use {name} with DDP "
                                  "(every rank steps every parameter) instead")


def attach(opt: Optimizer) -> None:
    """Called at the end of ``GeneratedOptimizer.__init__``: nothing unless ZeRO is constructing ``opt``."""
    zero = constructing_zero(opt)
    if zero is None:
        return
    if zero.world_size > 1:
        refuse_partition(opt)
    if zero.world_size > 1 and opt._program.accumulators:
        opt._zero1_pool = Pool(zero)  # read by GeneratedOptimizer._accumulator_sums
    if opt._program.published is not None:
        opt._zero1_adopted = {}
        opt.register_step_pre_hook(lambda o, args, kwargs: adopt_loaded_states(o))
    if zero.world_size > 1 and split_layers(opt, zero):
        opt._zero1_layers = zero
        pool_kourkoutas(opt)
        # after the adoption hook: a load rebuilds the Kourkoutas object
        opt.register_step_pre_hook(lambda o, args, kwargs: pool_kourkoutas(o))


def split_layers(opt: Optimizer, zero: Any) -> list[Any]:
    """Kourkoutas-beta's layers whose parameters are owned by different ranks."""
    kourkoutas = getattr(opt, "_kourkoutas", None)
    if kourkoutas is None:
        return []
    ranks: dict[Any, set[int]] = {}
    default_on = opt.defaults.get("kourkoutas_beta")
    for rank, groups in enumerate(zero._partition_parameters()):
        for group in groups:
            if not group.get("kourkoutas_beta", default_on):
                continue
            for p in group["params"]:
                ranks.setdefault(kourkoutas.key_fn(p), set()).add(rank)
    return [key for key, rs in ranks.items() if len(rs) > 1]


def _gather(zero: Any, mine: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * zero.world_size
    dist.all_gather_object(out, mine, group=zero.process_group)
    return out


class Pool:
    """Every rank's contributions to the optimizer-wide accumulators, by the position of their
    parameter in the unsharded optimizer (``ZeroRedundancyOptimizer``'s parameter order)."""

    def __init__(self, zero: Any) -> None:
        self.zero = zero
        self.index = {id(p): i for i, p in enumerate(zero._all_params)}

    def gather(self, opt: Optimizer, parts: dict[str, dict[int, list[Any]]],
               vectors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[int, list[Any]]], dict[str, torch.Tensor]]:
        """``opt._parts`` / ``opt._part_vectors`` of every rank, by global position (exact values)."""
        local = [q for g in opt.param_groups for q in g["params"]]
        mine = ({name: {self.index[id(local[pos])]: [(float(v), v.dtype) if isinstance(v, torch.Tensor) else (v, None)
                                                      for v in values] for pos, values in by_pos.items()}
                 for name, by_pos in parts.items()},
                {name: {self.index[id(local[pos])]: float(x) for pos, x in enumerate(buf.tolist())}
                 for name, buf in vectors.items()})
        merged: dict[str, dict[int, list[Any]]] = {}
        dense: dict[str, torch.Tensor] = {}
        n = len(self.zero._all_params)
        for rank_parts, rank_vectors in _gather(self.zero, mine):
            for name, by_pos in rank_parts.items():
                for pos, values in by_pos.items():
                    merged.setdefault(name, {})[pos] = [v if dt is None else torch.tensor(v, dtype=dt)
                                                        for v, dt in values]
            for name, by_pos in rank_vectors.items():
                buf = dense.setdefault(name, torch.zeros(n, dtype=torch.float32, device=vectors[name].device))
                for pos, x in by_pos.items():
                    if x != 0.0:
                        buf[pos] = x
        return merged, dense


def pool_kourkoutas(opt: Optimizer) -> None:
    """Make Kourkoutas-beta's per-layer norm pool the layer's parameters of every rank."""
    k = getattr(opt, "_kourkoutas", None)
    if k is None or getattr(k, "_zero1_pooled", False):
        return
    prepare = k.prepare

    def pooled(t: int) -> None:
        _pool_squares(opt, opt._zero1_layers, k)
        prepare(t)

    k.prepare = pooled
    k._zero1_pooled = True


def _pool_squares(opt: Optimizer, zero: Any, k: Any) -> None:
    """Each split layer's ``sum(g^2)`` summed over its parameters of every rank in the unsharded
    order (float32, as Kourkoutas.prepare adds them), left in this rank's first parameter's state
    (the others' zeroed), so the local prepare reads the layer's whole sum."""
    from optgen.runtime.kourkoutas import SQ

    index = {id(p): i for i, p in enumerate(zero._all_params)}
    mine = {}
    for b in k.buckets.values():
        for p in b["params"]:
            sq = opt.state[p].get(SQ) if p in opt.state else None
            if isinstance(sq, torch.Tensor):
                mine[index[id(p)]] = (float(sq), sq.dtype)
    squares: dict[int, tuple[float, torch.dtype]] = {}
    for theirs in _gather(zero, mine):
        squares.update(theirs)
    on = {id(p) for g in zero.param_groups if g.get("kourkoutas_beta", opt.defaults.get("kourkoutas_beta"))
          for p in g["params"]}
    members: dict[Any, list[int]] = {}
    for i, q in enumerate(zero._all_params):
        if id(q) in on:
            members.setdefault(k.key_fn(q), []).append(i)
    for key, b in k.buckets.items():
        acc = torch.zeros((), dtype=torch.float32)
        for i in members.get(key, []):
            if i in squares:
                acc += torch.tensor(squares[i][0], dtype=squares[i][1])
        first = True
        for p in b["params"]:
            sq = opt.state[p].get(SQ) if p in opt.state else None
            if isinstance(sq, torch.Tensor):
                sq.fill_(acc if first else 0.0)
                first = False


def _looks_published(opt: Optimizer, p: torch.Tensor, st: dict[str, Any]) -> bool:
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
    if any(isinstance(st.get(k), torch.Tensor) and st[k].dim() == p.dim() for k in lay.keepdim):
        return True  # torch's (*B, M, 1) / (*B, 1, N) factors; held as (*B, M) / (*B, N)
    return any(isinstance(st.get(k), torch.Tensor) and st[k].dim() == 1 and p.dim() != 1 for k in lay.flat)


def adopt_loaded_states(opt: Optimizer) -> None:
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
