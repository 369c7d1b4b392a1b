"""Parameters sharded across ranks: the step on local shards, with collectives where a value spans ranks.

FSDP2 (``torch.distributed.fsdp.fully_shard``) hands the optimizer DTensor parameters sharded on
dim 0 (``Shard(0)`` on a 1-D mesh, ``torch.chunk``'s split: rank ``r`` holds rows
``[r * ceil(n / W), ...)``, possibly none). The runtime steps their local tensors with the
backend's own code and keeps every state for the local shard only; this module says, per shape
kind, which values span ranks and reduces those with torch.distributed collectives:

- element-wise values are local;
- a value is *sharded* when its first dim is the parameter's dim 0: per-element values always,
  per-row values of a matrix (``(M, N)``: the rows are split), every kind of a batched parameter
  (``(B, M, N)``: whole matrices are split);
- a reduction over a sharded dim (``colsum``/``matvec_t`` of a matrix, ``dot``/``normalize`` of
  its per-row values, ``sum``/``mean``/``norm``/``vdot`` of a whole parameter) sums the local
  partial results with one ``all_reduce`` per op call over the bucket (not bit-identical to one
  process: the summation order changes, by a few ulps);
- whole-matrix calls (Newton-Schulz) gather each matrix to an owner rank (parameters assigned
  round-robin, so the work is balanced), run there, and scatter the rows back.

Parameters whose maths cannot be split this way (a matrix view of the flattened memory, the
strided statistics of Prodigy) are *gathered*: every rank steps the whole parameter with
replicated state and keeps its own rows (exact, at the cost of the state's 1/N saving).

The active layout of a bucket is a module global read by :mod:`optgen.runtime.foreach`; with
no sharded parameter nothing here runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from optgen.ir.nodes import Kind

#: the layout of the bucket being stepped (a plain global: dynamo traces a read of it, not of a ContextVar)
_BUCKET: list[list[Shard | None] | None] = [None]

#: bytes this process sent through the collectives of this module (a communication counter for
#: benchmarks and docs: all_reduce counts its buffer, gather/scatter the rows moved)
SENT = {"bytes": 0}


@dataclass(frozen=True)
class Shard:
    """Where one parameter's local tensor sits in the global parameter (dim 0 split over ``group``)."""

    group: Any  # torch.distributed.ProcessGroup
    rank: int  # this process's index in ``group``
    world: int
    shape: tuple[int, ...]  # the global shape
    start: int  # the first global index along dim 0 held here
    rows: int  # how many indices along dim 0 are held here
    owner: int  # the rank (in ``group``) that runs whole-matrix calls of this parameter

    def sharded(self, kind: str, ndim: int | None = None) -> bool:
        """Whether a value of ``kind`` ('element', 'row', 'col', 'matrix', 'tensor') is split
        along its first dim (``ndim``: of the tensor the parameter is stepped as)."""
        return split_first_dim(kind, len(self.shape) if ndim is None else ndim)

    def chunk(self) -> int:
        return -(-self.shape[0] // self.world) if self.shape else 0


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "_local_tensor")


def refuse_reductions(class_name: str) -> RuntimeError:
    """The error of a spec with optimizer-wide reductions stepped on sharded parameters."""
    return RuntimeError(f"{class_name}: optimizer-wide reductions (reductions:) are not implemented for sharded "
                        "parameters (FSDP2, ZeRO) yet")


def local(t: Any) -> Any:
    """The local tensor of a DTensor (the tensor itself otherwise)."""
    return t._local_tensor if is_dtensor(t) else t


def shard_of(p: torch.Tensor, position: int) -> Shard | None:
    """``p``'s layout, or None when ``p`` is not a DTensor sharded on dim 0 over several ranks."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as DShard

    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or len(placements) != 1:
        raise NotImplementedError(f"optgen steps DTensor parameters on a 1-D mesh (FSDP2's layout); got a "
                                  f"{mesh.ndim}-D mesh with placements {placements}")
    (placement,) = placements
    if isinstance(placement, Replicate):
        return None
    if not isinstance(placement, DShard) or placement.dim != 0:
        raise NotImplementedError(f"optgen steps DTensor parameters sharded on dim 0 (FSDP2's layout); got {placement}")
    world, rank = mesh.size(), mesh.get_local_rank()
    shape = tuple(p.shape)
    chunk = -(-shape[0] // world)
    start = min(rank * chunk, shape[0])
    rows = local(p).shape[0]
    return Shard(mesh.get_group(), rank, world, shape, start, rows, position % world)


def split_first_dim(kind: str, ndim: int) -> bool:
    """Whether a value of ``kind`` ('element', 'row', 'col', 'matrix', 'tensor') of a parameter
    stepped as an ``ndim``-dim tensor starts with the parameter's (split) dim 0."""
    return ndim >= {"element": 1, "row": 2, "col": 3, "matrix": 3}.get(kind, ndim + 1)


@contextlib.contextmanager
def bucket(layout: Any) -> Iterator[None]:
    """Make ``layout`` (a :class:`RowBucket` or :class:`FlatBucket`; None: nothing sharded) the ops' layout."""
    before = _BUCKET[0]
    _BUCKET[0] = layout
    try:
        yield
    finally:
        _BUCKET[0] = before


def active() -> Any:
    return _BUCKET[0]


# -- collectives --------------------------------------------------------------------------------
def _all_reduce_sum(parts: list[tuple[int, torch.Tensor]], shards: list[Shard | None]) -> dict[int, torch.Tensor]:
    """Sum each ``(index, partial)`` over its shard's group: one all_reduce per group and dtype."""
    import torch.distributed as dist

    out: dict[int, torch.Tensor] = {}
    groups: dict[tuple[int, torch.dtype], list[tuple[int, torch.Tensor]]] = {}
    for i, t in parts:
        groups.setdefault((id(shards[i].group), t.dtype), []).append((i, t))
    for members in groups.values():
        flat = torch.cat([t.reshape(-1) for _, t in members])
        SENT["bytes"] += flat.numel() * flat.element_size()
        dist.all_reduce(flat, group=shards[members[0][0]].group)
        offset = 0
        for i, t in members:
            out[i] = flat[offset:offset + t.numel()].view(t.shape)
            offset += t.numel()
    return out


#: how many dims a value of each kind has fewer than the tensor its parameter is stepped as
_FEWER = {"element": 0, "row": 1, "col": 1, "matrix": 2, "tensor": None}


class RowBucket:
    """FSDP2's layout of a bucket: each tensor's local rows (``shards[i]``; None: a whole tensor)."""

    def __init__(self, shards: list[Shard | None]) -> None:
        self.shards = shards

    def split(self, xs: list[torch.Tensor], kind: str) -> list[bool]:
        """Whether each value of ``kind`` is split across ranks along its first dim (a per-slice
        value of a sharded parameter: every rank holds the slice elements of its rows)."""
        if kind == "slice":
            return [s is not None for s in self.shards]
        fewer = _FEWER[kind]
        return [s is not None and fewer is not None and s.sharded(kind, x.dim() + fewer) for s, x in zip(self.shards, xs)]

    def reduce(self, parts: list[torch.Tensor], spans: list[bool]) -> list[torch.Tensor]:
        """Each partial result summed over the ranks where ``spans[i]`` (its reduced dims are split)."""
        across = [(i, t) for i, t in enumerate(parts) if spans[i] and self.shards[i] is not None]
        summed = _all_reduce_sum(across, self.shards) if across else {}
        return [summed.get(i, t) for i, t in enumerate(parts)]

    def _last(self, xs: list[torch.Tensor], kind: str) -> list[bool]:
        """Whether the last dim of each value is the split one (a 1-D per-row value of a matrix)."""
        return [s and x.dim() == 1 for s, x in zip(self.split(xs, kind), xs)]

    def matvec(self, w: list, v: list, fn: Callable) -> list:
        return [fn(x, y) for x, y in zip(w, v)]  # sums over the columns: whole on every rank

    def matvec_t(self, w: list, u: list, fn: Callable) -> list:
        return self.reduce([fn(x, y) for x, y in zip(w, u)], [x.dim() == 2 for x in w])

    def colsum(self, xs: list) -> list:
        return self.reduce([t.sum(-2) for t in xs], [t.dim() == 2 for t in xs])

    def rowsum(self, xs: list) -> list:
        return [t.sum(-1) for t in xs]

    def dot(self, a: list, b: list, kind: str, fn: Callable) -> list:
        return self.reduce([fn(x, y) for x, y in zip(a, b)], self._last(a, kind))

    def rownorm(self, xs: list) -> list:
        return [t.norm(dim=-1) for t in xs]  # each local row whole, as rowsum

    def colnorm(self, xs: list) -> list:
        sq = self.reduce([(t * t).sum(-2) for t in xs], [t.dim() == 2 for t in xs])
        return [t.sqrt() for t in sq]

    def matmean(self, xs: list, kind: str) -> list:
        spans = self._last(xs, kind)
        sums = self.reduce([t.sum(-1) for t in xs], spans)
        return [t / (s.shape[0] if split else x.shape[-1]) for t, x, s, split in zip(sums, xs, self.shards, spans)]

    def normalize(self, xs: list, kind: str) -> list:
        sq = self.reduce([(t * t).sum(-1, keepdim=True) for t in xs], self._last(xs, kind))
        return [t / n.sqrt().clamp_min(1e-12) for t, n in zip(xs, sq)]

    def vdot(self, a: list, b: list, kind: str, fn: Callable) -> list:
        return self.reduce([fn(x, y) for x, y in zip(a, b)], self.split(a, kind))

    def total(self, xs: list, kind: str, how: str) -> list:
        """``sum``, ``mean`` or ``norm`` of each whole value."""
        spans = self.split(xs, kind)
        sums = self.reduce([(t * t).sum() if how == "norm" else t.sum() for t in xs], spans)
        if how == "sum":
            return sums
        if how == "norm":
            return [t.sqrt() for t in sums]
        if kind == "slice" and any(spans):
            raise NotImplementedError("the mean of a per-slice value of a sharded parameter")
        return [t / (math.prod(x.shape[1:]) * s.shape[0] if split else x.numel())
                for t, x, s, split in zip(sums, xs, self.shards, spans)]

    def outer(self, a: list, b: list, fn: Callable) -> list:
        return [fn(x, y) for x, y in zip(a, b)]

    def to_elements(self, xs: list) -> list:
        return xs

    def whole(self, xs: list, fn: Callable) -> list:
        return whole(xs, self.shards, fn)

    def strided(self, xs: list, ks: list) -> list:
        """Every k-th element of each parameter's flat memory, as one process takes them
        (``flatten()[::k]`` of the whole): a shard's own elements of that slice."""
        return [t.reshape(-1)[slice_offset(s, int(k)):: int(k)] for t, s, k in zip(xs, self.shards, ks)]


def slice_offset(s: Shard | None, k: int) -> int:
    """The first local flat index of a shard that falls on the global ``[::k]`` slice."""
    if s is None:
        return 0
    return (-s.start * math.prod(s.shape[1:])) % k


def _slice_bounds(s: Shard, rank: int, k: int) -> tuple[int, int]:
    """The indices in the whole parameter's ``[::k]`` slice of the elements ``rank``'s rows hold."""
    rowlen, chunk = math.prod(s.shape[1:]), s.chunk()
    a, b = min(rank * chunk, s.shape[0]) * rowlen, min((rank + 1) * chunk, s.shape[0]) * rowlen
    return -(-a // k), -(-b // k)


def whole_slice(value: Any, lay: Layout, k: int | None) -> Any:
    """A per-slice state of a shard as the whole parameter's (all_gather: every rank calls it), so a
    checkpoint holds one process's slice whatever the world (it is not a torch.chunk of rows)."""
    import torch.distributed as dist

    if lay.mode != "sharded" or not k or not isinstance(value, torch.Tensor):
        return value
    s = lay.shard
    counts = [hi - lo for lo, hi in (_slice_bounds(s, r, k) for r in range(s.world))]
    mine = value.reshape(()).expand(counts[s.rank]) if value.dim() == 0 else value  # a 0-d zero p0
    padded = torch.zeros(max(counts), dtype=value.dtype, device=value.device)
    padded[: counts[s.rank]] = mine
    pieces = [torch.empty_like(padded) for _ in range(s.world)]
    SENT["bytes"] += padded.numel() * padded.element_size()
    dist.all_gather(pieces, padded, group=s.group)
    return torch.cat([q[:c] for q, c in zip(pieces, counts)])


def local_slice(value: Any, lay: Layout, k: int | None) -> Any:
    """A loaded per-slice state of the whole parameter (:func:`whole_slice`) as this shard's part."""
    if lay.mode != "sharded" or not k or not isinstance(value, torch.Tensor) or value.dim() != 1:
        return value
    s = lay.shard
    if value.numel() != -(-math.prod(s.shape) // k):
        return value  # already this shard's (a state dict of this world)
    lo, hi = _slice_bounds(s, s.rank, k)
    return value[lo:hi].clone()


def slice_source(lay: Layout, target: torch.Tensor, k: int | None) -> torch.Tensor:
    """What a per-slice state of ``target`` (a parameter's local rows) is taken from with
    ``flatten()[::k]``: its flat memory from the first element on the global slice."""
    if lay.mode != "sharded" or not k:
        return target
    return target.reshape(-1)[slice_offset(lay.shard, k):]


def whole(xs: list[torch.Tensor], shards: list[Shard | None], fn: Callable[[torch.Tensor, int], torch.Tensor]
          ) -> list[torch.Tensor]:
    """``fn`` of each whole tensor (its rows gathered on the owner rank), the result's local rows
    scattered back. Owners are round-robin, so the calls of a bucket run on every rank at once."""
    import torch.distributed as dist

    gathered: dict[int, torch.Tensor] = {}
    for i, (x, s) in enumerate(zip(xs, shards)):
        if s is None:
            continue
        padded = _pad_rows(x, s)
        pieces = [torch.empty_like(padded) for _ in range(s.world)] if s.rank == s.owner else None
        SENT["bytes"] += 0 if s.rank == s.owner else padded.numel() * padded.element_size()
        dist.gather(padded, pieces, dst=dist.get_global_rank(s.group, s.owner), group=s.group)
        if pieces is not None:
            gathered[i] = torch.cat(pieces)[: s.shape[0]]
    results = {i: fn(full, i) for i, full in gathered.items()}
    out: list[torch.Tensor] = []
    for i, (x, s) in enumerate(zip(xs, shards)):
        if s is None:
            out.append(fn(x, i))
            continue
        chunk = s.chunk()
        pieces = None
        if s.rank == s.owner:
            r = results[i]
            pad = torch.zeros((chunk * s.world - r.shape[0], *r.shape[1:]), dtype=r.dtype, device=r.device)
            pieces = list(torch.cat([r, pad]).split(chunk))
            SENT["bytes"] += sum(q.numel() * q.element_size() for k, q in enumerate(pieces) if k != s.rank)
        mine = torch.empty((chunk, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.scatter(mine, pieces, src=dist.get_global_rank(s.group, s.owner), group=s.group)
        out.append(mine[: s.rows])
    return out


def _pad_rows(x: torch.Tensor, s: Shard) -> torch.Tensor:
    chunk = s.chunk()
    if x.shape[0] == chunk:
        return x.contiguous()
    pad = torch.zeros((chunk - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    return torch.cat([x, pad])


def gather_full(t: torch.Tensor, s: Shard) -> torch.Tensor:
    """The whole tensor whose dim-0 rows ``t`` holds, on every rank (an all_gather)."""
    import torch.distributed as dist

    padded = _pad_rows(t, s)
    pieces = [torch.empty_like(padded) for _ in range(s.world)]
    SENT["bytes"] += padded.numel() * padded.element_size()
    dist.all_gather(pieces, padded, group=s.group)
    return torch.cat(pieces)[: s.shape[0]]


def state_sharded(kind: Kind, ndim: int, bits: bool) -> bool:
    """Whether a state of ``kind`` of a parameter with ``ndim`` dims holds the local rows only."""
    if kind == Kind.ELEMENT:
        return ndim >= (2 if bits else 1)  # 1-bit states are packed along the last dim
    name = {Kind.ROW: "row", Kind.COL: "col", Kind.MATRIX: "matrix"}.get(kind)
    return name is not None and split_first_dim(name, ndim)


# -- how the runtime steps one parameter ---------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How one parameter is stepped: ``plain`` (an ordinary tensor, or a replicated DTensor's local
    tensor), ``sharded`` (its local rows, states for those rows only) or ``gathered`` (the whole
    parameter on every rank, states replicated, the local rows kept)."""

    mode: str
    shard: Shard | None = None


PLAIN = Layout("plain")


def layout_of(p: torch.Tensor, position: int, view: tuple[int, int] | None, whole: bool) -> Layout:
    """``p``'s layout; ``view``: the matrix view it steps as; ``whole``: the program or backend
    needs whole parameters (strided statistics, the reference backend)."""
    s = shard_of(p, position)
    if s is None:
        return PLAIN
    if whole or (view is not None and view[0] != s.shape[0]):
        return Layout("gathered", s)
    return Layout("sharded", s)


def stepped_tensors(p: torch.Tensor, lay: Layout, view: tuple[int, int] | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int] | None]:
    """The parameter, gradient and view the backend steps for ``p``."""
    grad = p.grad
    if lay.mode == "plain":
        return local(p), local(grad), view
    if lay.mode == "sharded":
        lp = local(p)
        return lp, local(grad), stepped_view(lay, lp, view)
    s = lay.shard
    return gather_full(local(p), s), None if grad is None else gather_full(local(grad), s), view


def stepped_view(lay: Layout, target: torch.Tensor, view: tuple[int, int] | None) -> tuple[int, int] | None:
    """The matrix view of the tensor stepped for a parameter (local rows: ``(rows, -1)`` keeps its width)."""
    if lay.mode != "sharded" or view is None:
        return view
    return (target.shape[0], view[1])


def allocation_target(p: torch.Tensor, lay: Layout) -> torch.Tensor:
    """The tensor a parameter's states are shaped and initialised after."""
    if lay.mode == "gathered":
        return gather_full(local(p), lay.shard)
    return local(p)


def keep_rows(p: torch.Tensor, lay: Layout, full: torch.Tensor) -> None:
    """After a gathered step: this rank's rows of the stepped whole parameter into ``p``."""
    if lay.mode == "gathered":
        s = lay.shard
        local(p).copy_(full[s.start:s.start + s.rows])


def to_dtensor(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A state of ``p``'s local rows as a DTensor sharded like ``p`` (for torch.distributed.checkpoint)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as DShard

    shape = (p.shape[0], *value.shape[1:])
    stride = tuple(math.prod(shape[k + 1:]) for k in range(len(shape)))
    return DTensor.from_local(value, p.device_mesh, [DShard(0)], run_check=False, shape=torch.Size(shape),
                              stride=stride)


def from_dtensor(value: Any, p: torch.Tensor, rows: bool) -> Any:
    """A loaded state: a DTensor as this rank's rows of it (``rows``) or whole; anything else as it is."""
    if not is_dtensor(value):
        return value
    if not rows:
        return value.full_tensor()
    from torch.distributed.tensor import Shard as DShard

    if value.device_mesh == p.device_mesh:
        if tuple(value.placements) != (DShard(0),):
            value = value.redistribute(p.device_mesh, [DShard(0)])
        return local(value).clone()
    full = value.full_tensor()
    s = shard_of(p, 0)
    return full if s is None else full[s.start:s.start + s.rows].clone()


# -- ZeRO: flat shards of whole parameters (adams-torch's Adams_ZeRO) ------------------------------
#: the runtime's state of a ZeRO master shard (adams-torch's key)
MASTER = "master_param"


class FlatGroup:
    """adams-torch's ZeRO layout over ``group``: rank ``r`` owns the flat elements
    ``[r * n / W, (r + 1) * n / W)`` of every parameter; the per-element states and a master copy
    are those shards, the other states are whole on every rank (math/torch-adams-adamw-family.md §1.5)."""

    def __init__(self, group: Any, name: str) -> None:
        import torch.distributed as dist

        self.group, self.name = group, name
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.root = 0 if group is None else dist.get_global_rank(group, 0)  # the group's rank 0

    def check(self, i: int, p: torch.Tensor) -> None:
        if not p.is_contiguous():
            raise ValueError(f"{self.name}: parameter {i} (shape {tuple(p.shape)}) is not contiguous; "
                             f"ZeRO sharding steps flat views of the parameters")
        if p.numel() % self.world:
            raise ValueError(f"{self.name}: parameter {i} has {p.numel()} elements, which do not divide into "
                             f"{self.world} equal shards (adams-torch's ZeRO layout needs numel % world_size == 0)")

    def bounds(self, p: torch.Tensor) -> tuple[int, int]:
        n = p.numel() // self.world
        return self.rank * n, (self.rank + 1) * n

    def init_master(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rank 0's values of this rank's shard (scattered), in ``dtype``; every rank's ``p`` becomes
        rank 0's parameter, passed through ``dtype``."""
        import torch.distributed as dist

        shard = torch.empty(p.numel() // self.world, dtype=p.dtype, device=p.device)
        chunks = list(p.detach().view(-1).chunk(self.world)) if self.rank == 0 else None
        SENT["bytes"] += 0 if chunks is None else sum(c.numel() * c.element_size() for c in chunks[1:])
        dist.scatter(shard, chunks, src=self.root, group=self.group)
        master = shard.to(dtype)
        self.write(p, master)
        return master

    def grad(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """This rank's shard of the gradient summed over the ranks (reduce-scatter, SUM)."""
        import torch.distributed as dist

        out = torch.empty(p.numel() // self.world, dtype=dtype, device=p.device)
        g = p.grad.view(-1).to(dtype)
        SENT["bytes"] += g.numel() * g.element_size()
        dist.reduce_scatter_tensor(out, g, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def write(self, p: torch.Tensor, master: torch.Tensor) -> None:
        """Every rank's master shard gathered into ``p``."""
        import torch.distributed as dist

        m = master.to(p.dtype)
        SENT["bytes"] += m.numel() * m.element_size()
        with torch.no_grad():
            dist.all_gather_into_tensor(p.view(-1), m, group=self.group)


class FlatBucket:
    """The ops' layout for a bucket of ZeRO shards: per-element values are this rank's flat shard,
    every other kind is whole. A reduction reads whole tensors (the parameter itself, which every
    rank holds, or an all_gather of a shard), as adams-torch computes the power iteration on the
    full matrix on every rank; a per-element result keeps this rank's shard."""

    def __init__(self, zero: FlatGroup, params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
        self.zero, self.params, self.masters = zero, params, masters

    def _full(self, x: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        if x is self.masters[i]:
            return p  # the parameter is every rank's master shards gathered (same dtype)
        import torch.distributed as dist

        out = torch.empty(p.numel(), dtype=x.dtype, device=x.device)
        SENT["bytes"] += x.numel() * x.element_size()
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.zero.group)
        return out.view(p.shape)

    def _mine(self, full: torch.Tensor, i: int) -> torch.Tensor:
        lo, hi = self.zero.bounds(self.params[i])
        return full.reshape(-1)[lo:hi]

    def matvec(self, w: list, v: list, fn: Callable) -> list:
        return [fn(self._full(x, i), y) for i, (x, y) in enumerate(zip(w, v))]

    matvec_t = matvec

    def colsum(self, xs: list) -> list:
        return [self._full(t, i).sum(-2) for i, t in enumerate(xs)]

    def rowsum(self, xs: list) -> list:
        return [self._full(t, i).sum(-1) for i, t in enumerate(xs)]

    def dot(self, a: list, b: list, kind: str, fn: Callable) -> list:
        return [fn(x, y) for x, y in zip(a, b)]

    def rownorm(self, xs: list) -> list:
        return [self._full(t, i).norm(dim=-1) for i, t in enumerate(xs)]

    def colnorm(self, xs: list) -> list:
        return [self._full(t, i).norm(dim=-2) for i, t in enumerate(xs)]

    def matmean(self, xs: list, kind: str) -> list:
        return [t.mean(dim=-1) for t in xs]  # per-row / per-column values are whole here

    def normalize(self, xs: list, kind: str) -> list:
        import torch.nn.functional as TF

        return [TF.normalize(t, dim=-1) for t in xs]

    def vdot(self, a: list, b: list, kind: str, fn: Callable) -> list:
        if kind != "element":
            return [fn(x, y) for x, y in zip(a, b)]
        return [fn(self._full(x, i), self._full(y, i)) for i, (x, y) in enumerate(zip(a, b))]

    def total(self, xs: list, kind: str, how: str) -> list:
        full = [self._full(t, i) if kind == "element" else t for i, t in enumerate(xs)]
        if how == "norm":
            return list(torch._foreach_norm(full))
        return [t.sum() if how == "sum" else t.mean() for t in full]

    def outer(self, a: list, b: list, fn: Callable) -> list:
        return [self._mine(fn(x, y), i) for i, (x, y) in enumerate(zip(a, b))]

    def to_elements(self, xs: list) -> list:
        return [self._mine(x.expand(self.params[i].shape), i) for i, x in enumerate(xs)]

    def whole(self, xs: list, fn: Callable) -> list:
        return [self._mine(fn(self._full(x, i), i), i) for i, x in enumerate(xs)]


# -- the layer the executors ask for the tensors they step -----------------------------------------
def _nothing() -> None:
    return None


def bucket_tensors(opt: Any, group: dict[str, Any], items: list[tuple]) -> tuple[list[tuple], Any, Callable[[], None]]:
    """For a bucket's ``(param, host values, view)`` items: the ``(tensor, gradient, view)`` the
    backend steps for each, the ops' layout (None: nothing spans ranks) and what to run after the
    step (write the shards back)."""
    zero = opt._zero
    if zero is not None:  # ZeRO: the master shards and the reduce-scattered gradients
        stepped = [(opt.state[p][MASTER], zero.grad(p, p.dtype), None) for p, _, _ in items]

        def gathered() -> None:  # every rank's stepped shards into the parameters
            for (p, _, _), (t, _, _) in zip(items, stepped):
                zero.write(p, t)

        return stepped, FlatBucket(zero, [p for p, _, _ in items], [t for t, _, _ in stepped]), gathered
    if not any(is_dtensor(p) for p, _, _ in items):
        return [(p, p.grad, view) for p, _, view in items], None, _nothing
    lays = [opt._layout(p, group) for p, _, _ in items]  # DTensors: their local rows, or gathered
    stepped = [stepped_tensors(p, lay, view) for (p, _, view), lay in zip(items, lays)]
    shards = [lay.shard if lay.mode == "sharded" else None for lay in lays]

    def kept() -> None:
        for (p, _, _), lay, (t, _, _) in zip(items, lays, stepped):
            keep_rows(p, lay, t)

    return stepped, RowBucket(shards) if any(shards) else None, kept


def whole_tensors(opt: Any, group: dict[str, Any], p: torch.Tensor) -> tuple[torch.Tensor, Any, Callable[[], None]]:
    """The whole parameter and gradient (a DTensor's gathered) and what to run after its step."""
    lay = opt._layout(p, group)
    param, grad, _ = stepped_tensors(p, lay, None)
    return param, grad, lambda: keep_rows(p, lay, param)
