"""The published class's state-dict layout (a spec's ``matches.state_dict``), applied both ways.

``state_dict()`` writes it, so a checkpoint of a generated optimizer loads into the published class
(adv_optm's int ``step``, its ``actual_state_precision`` group key and ``factored``/``is_muon``
flags; adams-torch's flat ``master_param``/moment shards), and ``load_state_dict`` reads it back
into this class's own layout. Everything is driven by the program's :class:`PublishedLayout`; a
layout this class cannot represent (a shard of a multi-process run, a master copy in another dtype)
is refused with a ValueError that says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer  # a GeneratedOptimizer: base.py imports this module, not the reverse

from optgen.ir.codecs import codec_for
from optgen.ir.nodes import Assign, walk_nodes, walk_stmts
from optgen.ir.ops import Op
from optgen.numerics.host import HostContext, evaluate
from optgen.numerics.matrix_view import view_shape

if TYPE_CHECKING:
    from optgen.ir.nodes import PublishedLayout


def to_published(opt: Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` (torch's ``state_dict()`` of ``opt``) in the published layout.

    torch's packed groups are fresh dicts, its per-parameter states the live ones: those are copied
    before anything changes, so the optimizer's own state is untouched.
    """
    prog = opt._program
    lay: PublishedLayout = prog.published
    for group, saved in zip(opt.param_groups, sd["param_groups"]):
        ctx = HostContext(group, torch.empty(0), {}, tensor_math=False)
        for name, node in lay.group:
            saved[name] = evaluate(node, ctx)
    params = [(p, g) for g in opt.param_groups for p in g["params"]]
    state = {}
    books: dict[tuple, torch.Tensor] = {}  # one saved copy of each code book, shared as bnb shares its own
    for k, v in sd["state"].items():
        if not isinstance(k, int) or k >= len(params):
            state[k] = v
            continue
        p, group = params[k]
        live = opt.state[p]
        ctx = HostContext(group, p, live, tensor_math=False, view=view_shape(prog, p, group, live))
        st = dict(v)
        if lay.step_if is not None and not evaluate(lay.step_if, ctx):
            st.pop("step", None)
        elif lay.step == "int" and isinstance(st.get("step"), torch.Tensor):
            st["step"] = int(st["step"].item())
        for e in lay.state:
            if e.cond is not None and not evaluate(e.cond, ctx):
                continue
            if e.codebook is not None:
                key = (*_book_of(prog, group, e.codebook), p.device)
                if key not in books:
                    books[key] = codec_for(key[0]).table("qmap", key[1], p.device).clone()
                st[e.name] = books[key]
                continue
            vals = [evaluate(n, ctx) for n in e.values]
            if e.dtype is not None:
                st[e.name] = torch.tensor(vals, dtype=getattr(torch, e.dtype), device=p.device)
            else:
                st[e.name] = tuple(vals) if e.is_list else vals[0]
        for name in lay.flat:
            if isinstance(st.get(name), torch.Tensor):
                st[name] = st[name].reshape(-1)
        for name in lay.keepdim:  # a view: the saved tensor is the live state, as torch's are
            if isinstance(st.get(name), torch.Tensor):
                st[name] = st[name].unsqueeze(_kept_dim(prog, name))
        for name, mask in lay.masked:  # the published 1-D vectors of the masked elements
            if isinstance(st.get(name), torch.Tensor) and isinstance(st.get(mask), torch.Tensor):
                st[name] = st[name][st[mask]]
        if lay.master is not None and lay.master not in st:  # ZeRO keeps a master shard of its own
            st[lay.master] = p.detach().reshape(-1)  # in one process the master copy is the parameter itself
        for name in lay.none_if_absent:
            st.setdefault(name, None)
        for ours, theirs in lay.rename:
            if ours in st:
                st[theirs] = st.pop(ours)
        for key, names in lay.wrap:  # nested last: the entries under their published names
            inner = {n: st.pop(n) for n in names if n in st}
            if inner:
                st[key] = inner
        state[k] = st
    return {**sd, "state": state}


def _book_of(prog: Any, group: dict, state: str) -> tuple[str, bool]:
    """(codec, non-negative) of the codec that stores ``state`` for ``group``: the one its
    ``state_precision`` names (feature state_precision), as the step's decode of it reads it."""
    name = group.get("state_precision")
    for s in walk_stmts(prog.body):
        if isinstance(s, Assign):
            for n in walk_nodes(s.value):
                if n.op == Op.DECODE and n.attr[0] == name and n.attr[1] == state:
                    return name, n.attr[2]
    raise ValueError(f"{prog.class_name}: state_precision={name!r} does not code state '{state}': it has no code book")


def from_published(opt: Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` (published layout or this class's own) in this class's own layout; ``sd`` is not changed.

    A saved group or parameter count that does not match is left for ``load_state_dict`` to refuse.
    """
    prog = opt._program
    lay: PublishedLayout = prog.published
    name = type(opt).__name__
    declared = {d.name for d in prog.state}
    group_keys = {k for k, _ in lay.group}
    entry_keys = {e.name for e in lay.state} - declared
    groups = [{k: v for k, v in g.items() if k not in group_keys} for g in sd["param_groups"]]
    for saved, own in zip(groups, opt.param_groups):  # the published class's attributes: this optimizer's
        for key in lay.attributes:
            if key not in saved and key in own:
                saved[key] = own[key]
    saved_ids = [i for g in groups for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    id_map = dict(zip(saved_ids, params)) if len(saved_ids) == len(params) else {}
    steps = [v["step"] for v in sd["state"].values() if isinstance(v, dict) and "step" in v]
    # the step of a parameter the published class keeps none for (Muon's matrices): the others'
    fill = max((float(s.item() if isinstance(s, torch.Tensor) else s) for s in steps), default=0.0)
    state: dict[Any, Any] = {}
    for k, v in sd["state"].items():
        p = id_map.get(k)
        if p is None or not isinstance(v, dict):
            state[k] = v
            continue
        index = saved_ids.index(k)
        where = f"loaded state dict: parameter {index} (shape {tuple(p.shape)})"
        v = dict(v)
        for key, _ in lay.wrap:  # bitsandbytes' nested entries, back at the top level
            if isinstance(v.get(key), dict):
                v.update(v.pop(key))
        for ours, theirs in lay.rename:
            if theirs in v and ours not in v:
                v[ours] = v.pop(theirs)
        for e in lay.state:  # a saved code book must be the one this class decodes with
            saved = v.get(e.name)
            if e.codebook is not None and isinstance(saved, torch.Tensor):
                gi = next(i for i, g in enumerate(sd["param_groups"]) if k in g["params"])
                codec, non_neg = _book_of(prog, {**opt.param_groups[gi], **sd["param_groups"][gi]}, e.codebook)
                if not torch.equal(saved.to("cpu", torch.float32), codec_for(codec).table("qmap", non_neg, "cpu")):
                    raise ValueError(f"{where}: '{e.name}' is not the code book {name} decodes '{e.codebook}' with "
                                     f"(state_precision={codec!r}): a state quantised with another map cannot be "
                                     "loaded")
        st = {key: val for key, val in v.items() if key not in entry_keys}
        for key in lay.none_if_absent:
            if key in st and st[key] is None:
                del st[key]
        if lay.step_if is not None and "step" not in st and prog.step_store == "tensor":
            st["step"] = torch.tensor(fill, dtype=torch.get_default_dtype())
        if getattr(opt, "_zero", None) is not None:  # ZeRO across ranks: flat shards and master, as saved
            state[k] = st
            continue
        for key in lay.flat:
            if isinstance(st.get(key), torch.Tensor):
                st[key] = _unflatten(st[key], p, f"{where}: state '{key}'", name)
        for key in lay.keepdim:  # saved (*B, M, 1) / (*B, 1, N): the shape check of the load follows
            t = st.get(key)
            dim = _kept_dim(prog, key) if isinstance(t, torch.Tensor) else None
            if dim is not None and t.dim() == p.dim() and t.size(dim) == 1:
                st[key] = t.squeeze(dim)
        for key, mask in lay.masked:
            value, m = st.get(key), st.get(mask)
            if isinstance(value, torch.Tensor) and isinstance(m, torch.Tensor) and tuple(value.shape) != tuple(p.shape):
                m = m.to(dtype=torch.bool, device=value.device)
                if value.dim() != 1 or value.numel() != int(m.sum()) or tuple(m.shape) != tuple(p.shape):
                    raise ValueError(f"{where}: state '{key}' has shape {tuple(value.shape)}, expected the "
                                     f"{int(m.sum())} elements its mask '{mask}' selects or {tuple(p.shape)}")
                full = torch.zeros(p.shape, dtype=value.dtype, device=value.device)
                full[m] = value
                st[key] = full
        if lay.master is not None and lay.master in st:
            master = st.pop(lay.master)
            if isinstance(master, torch.Tensor):
                master = master.detach()  # adams-torch's is a view of its parameter made under no_grad
                master = _unflatten(master, p, f"{where}: '{lay.master}'", name)
                if master.dtype != p.dtype:
                    raise ValueError(
                        f"{where}: '{lay.master}' is a {master.dtype} master copy of a {p.dtype} parameter, which "
                        f"{name} cannot represent: it steps the parameter itself (master dtype = parameter dtype)")
                with torch.no_grad():  # the published class's load writes its master copy into the parameter
                    p.copy_(master)
        state[k] = st
    return {**sd, "param_groups": groups, "state": state}


def _kept_dim(prog: Any, name: str) -> int:
    """Where a per-row (-1) or per-column (-2) state keeps its reduced dim in the published layout."""
    from optgen.ir.nodes import Kind

    return -1 if prog.state_decl(name).kind == Kind.ROW else -2


def _unflatten(t: torch.Tensor, p: torch.Tensor, where: str, name: str) -> torch.Tensor:
    """A flat published state as ``p``'s shape; a shard of a multi-process run cannot be one."""
    if t.numel() == p.numel():
        return t.reshape(p.shape)
    if t.dim() == 1 and t.numel() and p.numel() % t.numel() == 0:
        ranks = p.numel() // t.numel()
        raise ValueError(
            f"{where} is a shard of {t.numel()} of the parameter's {p.numel()} elements: a state dict of one rank "
            f"of {ranks} (ZeRO-sharded), which {name} cannot represent: it runs in one process and keeps whole "
            "states; gather the shards of every rank into one state dict first")
    raise ValueError(f"{where} has {t.numel()} elements, the parameter {p.numel()}")
