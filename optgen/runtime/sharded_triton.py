"""The triton backend on FSDP2's local shards: the fused kernels over each rank's rows, with
collectives between the stages where a value spans ranks.

The runner of a sharded optimizer (:class:`ShardedTritonRunner`) is the triton runner stepping
*stand-ins* (:class:`ShardedTritonExecutor`): a DTensor's local tensor (its rows, states for those
rows only) or, for a gathered layout (optgen.runtime.sharding.Layout), the whole parameter. A
branch path's launches are those of one process; what changes for a sharded tensor (re-planned
from the program per path: optgen.backends.triton_plan) is:

- the prologue reads the *global* shape (``rows``, ``numel`` in host values: Adams' ``sqrt(rows)``),
  tiled passes and vector stages the global ``numel`` (a mean's divisor), flat passes the local
  one (their bound);
- after an element pass, each reduction whose reduced dims include the split dim 0 (a column sum
  of a matrix, a sum / norm / dot over a whole parameter) is summed over the ranks with one
  ``all_reduce`` per pass (the summation order changes: a few ulps, as the torch backend's
  RowBucket); a mean read by a later flat pass (which divides by the local ``numel``) is written
  as the value whose division by the local count gives the global mean's float32 result;
- a vector stage that reduces a per-row vector of a row-split matrix (Adams' ``normalize(W v)``
  and ``dot(u, W v)``) runs on every rank over the gathered vectors (all_gather: a matrix's
  per-row values, not its elements) and keeps its rows: the one-process kernel on the same values;
- a call stage (Newton-Schulz) gathers each matrix to its owner rank (round-robin), runs there
  and scatters the rows back (optgen.runtime.sharding.whole).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from optgen.ir.nodes import Kind, walk_nodes
from optgen.ir.ops import Op
from optgen.numerics.host import HostContext
from optgen.numerics.matrix_view import view_shape
from optgen.runtime import sharding
from optgen.runtime.triton_runner import TritonRunner, _Bucket, _dims, _static_pass

_KIND_NAME = {Kind.ROW: "row", Kind.COL: "col", Kind.MATRIX: "matrix", Kind.TENSOR: "tensor"}


def _size(kind: Kind, b: int, m: int, n: int) -> int:
    return {Kind.ROW: b * m, Kind.COL: b * n, Kind.MATRIX: b, Kind.TENSOR: 1}[kind]


def _split(kind: Kind, ndim: int) -> bool:
    """Whether a value of ``kind`` of a parameter stepped as ``ndim`` dims starts with its split dim 0."""
    name = _KIND_NAME.get(kind)
    return name is not None and sharding.split_first_dim(name, ndim)


@dataclass
class _VecGlobal:
    """A vector stage run over gathered values: its table, workspace and per-tensor copies."""

    table: torch.Tensor
    ws: torch.Tensor
    #: (t, offset in ws, offset in the scratch ws, local size, global size, split)
    temps: list[tuple[int, int, int, int, int, bool]]
    #: (t, state name, gathered buffer)
    states: list[tuple[int, str, torch.Tensor]]


@dataclass
class _BucketShards:
    shards: list[sharding.Shard | None]
    ndims: list[int]
    local_dims: list[tuple[int, int, int]]
    global_dims: list[tuple[int, int, int]]
    host: torch.Tensor  # the bucket's table on the host (workspace offsets read without a sync)
    meta_table: torch.Tensor  # the prologue's: global shape columns
    numel_table: torch.Tensor  # tiled passes' and vector stages': the global numel
    stages: list[Any]  # the path plan's stages (launch i + 1 runs stage i)
    #: pass stage -> reduce temps (name, kind)
    reduces: dict[int, list[tuple[str, Kind]]] = field(default_factory=dict)
    #: reduce temps a flat pass divides by the (local) numel: means
    flat_means: set[str] = field(default_factory=set)
    global_vec: dict[int, bool] = field(default_factory=dict)
    vec: dict[int, _VecGlobal] = field(default_factory=dict)


class ShardedTritonRunner(TritonRunner):
    """The triton runner over stand-ins of sharded parameters (see the module docstring)."""

    def __init__(self, program: Any, module_name: str) -> None:
        super().__init__(program, module_name)
        #: id(stand-in) -> (the optimizer's parameter, its layout), set for each step
        self.bound: dict[int, tuple[torch.Tensor, sharding.Layout]] = {}
        self._params: list[torch.Tensor] = []
        self._group: dict = {}
        self._states: dict = {}
        self._plans: dict[tuple, Any] = {}

    def step(self, gi: int, group: dict, params: list[torch.Tensor], states: dict, *args: Any, **kwargs: Any
             ) -> dict[str, torch.Tensor]:
        self._params, self._group, self._states = params, group, states
        return super().step(gi, group, params, states, *args, **kwargs)

    # -- host facts and views of the whole parameter --------------------------------------------
    def _orig(self, p: torch.Tensor) -> tuple[torch.Tensor, sharding.Layout]:
        return self.bound.get(id(p), (p, sharding.PLAIN))

    def _static_env(self, group: dict, p: torch.Tensor, state: dict) -> tuple[tuple, dict]:
        orig, _ = self._orig(p)  # conditions and host values read the whole parameter's facts
        ctx = HostContext(group, orig, state, tensor_math=False, view=view_shape(self.program, orig, group, state))
        key: list[tuple[str, bool]] = []
        _static_pass(self.program.body, ctx, key, self.dynamic)
        return tuple(key), ctx.env

    def _view(self, group: dict, p: torch.Tensor, state: dict) -> tuple[int, int] | None:
        orig, lay = self._orig(p)
        view = view_shape(self.program, orig, group, state)
        return sharding.stepped_view(lay, p, view)

    # -- the plan of a bucket's path, and what crosses ranks --------------------------------------
    def _plan(self, key: tuple) -> Any:
        if key not in self._plans:
            from optgen.backends.triton_plan import dynamic_names, enumerate_paths, plan_path

            dyn = dynamic_names(self.program)
            found = [(k, s) for k, s in enumerate_paths(self.program.body, dyn, fixed=dict(key)) if k == key]
            if len(found) != 1:  # pragma: no cover - the runner's keys are enumerate_paths' keys
                raise RuntimeError(f"{self.program.class_name}: branch path {key} not found for a sharded step")
            self._plans[key] = plan_path(self.program, key, found[0][1], dyn)
        return self._plans[key]

    def _info(self, bucket: _Bucket) -> _BucketShards | None:
        if hasattr(bucket, "sharding"):
            return bucket.sharding
        info = None
        shards, ndims, local_dims, global_dims = [], [], [], []
        for t, i in enumerate(bucket.idx):
            p = self._params[i]
            orig, lay = self._orig(p)
            shards.append(lay.shard if lay.mode == "sharded" else None)
            view = bucket.views[t]
            ndims.append(len(view) if view is not None else p.dim())
            local_dims.append(_dims(p, view))
            global_view = view_shape(self.program, orig, self._group, self._states[p])
            global_dims.append(_dims(orig, global_view) if lay.mode == "sharded" else local_dims[-1])
        if any(s is not None for s in shards):
            info = self._describe(bucket, shards, ndims, local_dims, global_dims)
        bucket.sharding = info  # type: ignore[attr-defined]  # rebuilt with the bucket
        return info

    def _describe(self, bucket: _Bucket, shards: list, ndims: list[int], local_dims: list, global_dims: list
                  ) -> _BucketShards:
        cols = bucket.path.columns
        meta, numel = bucket.table.clone(), bucket.table.clone()
        for t, s in enumerate(shards):
            if s is None:
                continue
            b, m, n = global_dims[t]
            total = math.prod(self._orig(self._params[bucket.idx[t]])[0].shape)
            for name, value in (("numel", total), ("B", b), ("M", m), ("N", n)):
                meta[t, cols.index(name)] = value
            numel[t, cols.index("numel")] = total
        plan = self._plan(bucket.key)
        if len(plan.stages) + 1 != len(bucket.path.launches):  # pragma: no cover - one launch per stage
            raise RuntimeError(f"{self.program.class_name}: a sharded step's plan does not match its kernels")
        info = _BucketShards(shards, ndims, local_dims, global_dims, bucket.table.cpu(), meta, numel, plan.stages)
        for k, st in enumerate(plan.stages):
            if st.kind == "pass":
                info.reduces[k] = [(s.target, s.value.kind) for s in st.statements if s.role == "reduce"]
                if st.layout == "flat":
                    for s in st.statements:
                        for node in walk_nodes(s.value):
                            if node.op == Op.DIV and node.args[1].op == Op.META and node.args[0].op == Op.VAR:
                                info.flat_means.add(node.args[0].attr)
            elif st.kind == "vec":
                info.global_vec[k] = any(s is not None and _vec_spans(st, nd) for s, nd in zip(shards, ndims))
            elif st.kind == "call" and any(s is not None and nd != 2 for s, nd in zip(shards, ndims)):
                raise NotImplementedError(f"{self.program.class_name}: a whole-matrix call on a sharded parameter "
                                          "stepped with other than 2 dims on the triton backend")
        return info

    # -- launches ----------------------------------------------------------------------------------
    def _launch(self, bucket: _Bucket, index: int, kernel_name: str, kind: str, table: torch.Tensor,
                ws: torch.Tensor, gptr: torch.Tensor, hyp: torch.Tensor, steps: torch.Tensor, hs_args: dict) -> None:
        info = self._info(bucket)
        if info is None:
            super()._launch(bucket, index, kernel_name, kind, table, ws, gptr, hyp, steps, hs_args)
            return
        stage = index - 1
        if kind == "prologue":
            table = info.meta_table
        elif kind == "call":
            self._call(bucket, info, int(kernel_name[4:]), ws)
            return
        elif kind == "vec" and info.global_vec.get(stage):
            self._vec_global(bucket, info, stage, index, kernel_name, ws, gptr, hyp, steps, hs_args)
            return
        elif kind in ("tiled", "vec"):
            table = info.numel_table
        super()._launch(bucket, index, kernel_name, kind, table, ws, gptr, hyp, steps, hs_args)
        if kind in ("flat", "tiled") and info.reduces.get(stage):
            self._reduce(bucket, info, stage, ws)

    def _reduce(self, bucket: _Bucket, info: _BucketShards, stage: int, ws: torch.Tensor) -> None:
        """Sum the partial reductions of this pass whose reduced dims include the split dim 0."""
        cols = bucket.path.columns
        parts: list[tuple[int, torch.Tensor]] = []
        means: list[tuple[int, torch.Tensor]] = []
        for t, s in enumerate(info.shards):
            if s is None:
                continue
            for name, kind in info.reduces[stage]:
                if kind == Kind.SLICE:
                    raise NotImplementedError(f"{self.program.class_name}: a per-slice reduction of a sharded "
                                              "parameter on the triton backend")
                if _split(kind, info.ndims[t]):
                    continue  # whole rows (a row sum) or batched matrices: local
                off = int(info.host[t, cols.index(f"ws:{name}")])
                part = ws[off:off + _size(kind, *info.local_dims[t])]
                parts.append((t, part))
                if name in info.flat_means:
                    means.append((t, part))
        if not parts:
            return
        summed = sharding._all_reduce_sum(list(enumerate(part for _, part in parts)),
                                          [info.shards[t] for t, _ in parts])
        for k, (_, part) in enumerate(parts):
            part.copy_(summed[k])
        for t, part in means:
            p, orig = self._params[bucket.idx[t]], self._orig(self._params[bucket.idx[t]])[0]
            part.copy_(_local_mean_numerator(part, p.numel(), math.prod(orig.shape)))

    def _call(self, bucket: _Bucket, info: _BucketShards, c: int, ws: torch.Tensor) -> None:
        """A whole-matrix call: local tensors batched as one process does, sharded ones on an owner."""
        from optgen.numerics import newton_schulz as ns
        from optgen.runtime.triton_runner import _run_call

        call = bucket.path.calls[c]
        cols = bucket.path.columns
        cin, cout = cols.index(f"ws:{call.input}"), cols.index(f"ws:{call.output}")
        local_work = []
        for op, args, shape, offsets in bucket.calls[c]:
            sharded = {int(info.host[t, cin]) for t, s in enumerate(info.shards) if s is not None}
            keep = [(i, o) for i, o in offsets if i not in sharded]
            if keep:
                local_work.append((op, args, shape, keep))
        _run_call(local_work, ws)
        xs, shards, outs, argv = [], [], [], []
        for t, s in enumerate(info.shards):
            p = self._params[bucket.idx[t]]
            if s is None:
                continue
            b, m, n = info.local_dims[t]
            env = bucket.envs[t]
            args = tuple(env[v] if kind == "var" else v for kind, v in call.args)
            i, o = int(info.host[t, cin]), int(info.host[t, cout])
            xs.append(ws[i:i + b * m * n].view(b * m, n) if p.numel() else ws[i:i].view(0, n))
            shards.append(s)
            outs.append(o)
            argv.append(args)
        if not xs:
            return
        results = sharding.whole(xs, shards, lambda full, k: getattr(ns, call.op)(full, *argv[k]))
        for x, o, y in zip(xs, outs, results):
            ws[o:o + x.numel()].copy_(y.reshape(-1))

    def _vec_global(self, bucket: _Bucket, info: _BucketShards, stage: int, index: int, kernel_name: str,
                    ws: torch.Tensor, gptr: torch.Tensor, hyp: torch.Tensor, steps: torch.Tensor, hs_args: dict) -> None:
        """A vector stage over the gathered per-row values of the sharded tensors, their rows kept."""
        g = info.vec.get(stage)
        if g is None:
            g = info.vec[stage] = self._vec_layout(bucket, info)
        for t, off, soff, size, gsize, split in g.temps:
            src = ws[off:off + size]
            if split:
                s = info.shards[t]
                per = gsize // s.shape[0] if s.shape[0] else 0  # values per index of dim 0
                g.ws[soff:soff + gsize].copy_(sharding.gather_full(src.view(s.rows, per), s).reshape(-1))
            else:
                g.ws[soff:soff + size].copy_(src)
        for t, name, buf in g.states:
            s = info.shards[t]
            st = self._states[self._params[bucket.idx[t]]][name]
            per = buf.numel() // s.shape[0] if s.shape[0] else 0
            buf.copy_(sharding.gather_full(st.reshape(s.rows, per), s).reshape(buf.shape))
        super()._launch(bucket, index, kernel_name, "vec", g.table, g.ws, gptr, hyp, steps, hs_args)
        for t, off, soff, size, gsize, split in g.temps:
            if split:
                s = info.shards[t]
                per = gsize // s.shape[0] if s.shape[0] else 0
                ws[off:off + size].copy_(g.ws[soff + s.start * per:soff + s.start * per + size])
            else:
                ws[off:off + size].copy_(g.ws[soff:soff + size])
        for t, name, buf in g.states:
            s = info.shards[t]
            st = self._states[self._params[bucket.idx[t]]][name]
            per = buf.numel() // s.shape[0] if s.shape[0] else 0
            st.view(-1).copy_(buf.view(-1)[s.start * per:s.start * per + st.numel()])

    def _vec_layout(self, bucket: _Bucket, info: _BucketShards) -> _VecGlobal:
        cols = bucket.path.columns
        table = info.meta_table.clone()
        kinds = {d.name: d.kind for d in self.program.state}
        temps, states = [], []
        offset = 0
        for t in range(len(bucket.idx)):
            s = info.shards[t]
            nd = info.ndims[t]
            for name, kind_name, _ in bucket.path.temps:
                kind = Kind[kind_name.upper()]
                if kind in (Kind.ELEMENT, Kind.SLICE):
                    continue
                c = cols.index(f"ws:{name}")
                size = _size(kind, *info.local_dims[t])
                split = s is not None and _split(kind, nd)
                gsize = _size(kind, *info.global_dims[t]) if split else size
                temps.append((t, int(info.host[t, c]), offset, size, gsize, split))
                table[t, c] = offset
                offset += -(-gsize // 4) * 4
            if s is None:
                continue
            p = self._params[bucket.idx[t]]
            for col in cols:
                if not col.startswith("state:"):
                    continue
                name = col[6:]
                st = self._states[p].get(name)
                if kinds.get(name) in (Kind.ELEMENT, Kind.SLICE, None) or not isinstance(st, torch.Tensor) \
                        or not _split(kinds[name], nd):
                    continue
                buf = torch.empty((s.shape[0], *st.shape[1:]), dtype=st.dtype, device=st.device)
                states.append((t, name, buf))
                table[t, cols.index(col)] = buf.data_ptr()
        scratch = torch.zeros(max(offset, 1), dtype=torch.float32, device=bucket.ws.device)
        return _VecGlobal(table, scratch, temps, states)


def _vec_spans(stage: Any, ndim: int) -> bool:
    """Whether a vector stage reduces over the split dim 0 of a parameter stepped as ``ndim`` dims:
    a row vector's norm / dot / mean of a matrix, or a sum over split values."""
    for s in stage.statements:
        for n in walk_nodes(s.value):
            if n.op in (Op.NORMALIZE, Op.DOT, Op.MATMEAN) and ndim == 2 and n.args[0].kind == Kind.ROW:
                return True
            if n.op == Op.SUM and _split(n.args[0].kind, ndim):
                return True
    return False


def _local_mean_numerator(total: torch.Tensor, local_numel: int, global_numel: int) -> torch.Tensor:
    """The float32 value ``x`` with ``x / local_numel == total / global_numel`` in float32 (IEEE
    division, as the kernels' ``L.div``): a flat pass divides a mean's sum by the local count."""
    n_g = float(global_numel)
    target = (total / n_g).to(torch.float32)
    x = (target.double() * local_numel).to(torch.float32)
    n_l = torch.tensor(float(local_numel), dtype=torch.float32)
    for _ in range(8):  # a few ulps around the product: monotone in x
        q = x / n_l
        if bool((q == target).all()):
            return x
        x = torch.where(q < target, torch.nextafter(x, torch.full_like(x, math.inf)),
                        torch.where(q > target, torch.nextafter(x, torch.full_like(x, -math.inf)), x))
    return x
