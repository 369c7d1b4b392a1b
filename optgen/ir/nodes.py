"""The IR: typed expression nodes with shape kinds, statements, and the program of one optimizer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from optgen.errors import Position


class Kind(enum.IntEnum):
    """What a value varies over, relative to its parameter of shape ``(*B, M, N)``.

    HOST values live on the host (hyperparameters, step-dependent scalars, per-parameter facts such
    as ``numel``); the others live on the parameter's device.
    """

    HOST = 0  # per-group / per-parameter scalar, computed on the host
    TENSOR = 1  # one device scalar per parameter: shape ()
    MATRIX = 2  # one value per matrix of a batched parameter: shape (*B,)
    ROW = 3  # one value per row of the last two dims: shape (*B, M)
    COL = 4  # one value per column of the last two dims: shape (*B, N)
    ELEMENT = 5  # the parameter's own shape
    SLICE = 6  # every k-th element of the flattened parameter (Prodigy's statistics): shape (ceil(numel/k),)
    BLOCK = 7  # one value per block of consecutive flat elements (a codec's scales): shape (ceil(numel/block),)

    @property
    def label(self) -> str:
        return {
            Kind.HOST: "host scalar",
            Kind.TENSOR: "per-tensor",
            Kind.MATRIX: "per-matrix",
            Kind.ROW: "per-row",
            Kind.COL: "per-column",
            Kind.ELEMENT: "per-element",
            Kind.SLICE: "per-slice-element",
            Kind.BLOCK: "per-block",
        }[self]


def join(a: Kind, b: Kind) -> Kind | None:
    """The kind of an elementwise combination of ``a`` and ``b`` (None: they do not broadcast)."""
    if a == b:
        return a
    lo, hi = min(a, b), max(a, b)
    if hi == Kind.SLICE:  # a strided slice broadcasts only against scalars
        return hi if lo <= Kind.TENSOR else None
    if lo <= Kind.MATRIX:
        return hi
    if hi == Kind.ELEMENT:
        return Kind.ELEMENT
    return None  # ROW with COL: only outer() combines them


@dataclass(frozen=True)
class Node:
    """One IR expression node.

    Leaves: ``const`` (attr = value), ``hyper`` (attr = (name, index)), ``step``, ``meta``
    (attr = numel | ndim | rows | cols), ``var`` (attr = name), ``has`` (attr = state name),
    ``param_attr`` (attr = (attribute, default)). Everything else is an operation from
    :mod:`optgen.ir.library` applied to ``args``.
    """

    op: str
    args: tuple[Node, ...] = ()
    kind: Kind = Kind.HOST
    attr: Any = None
    boolean: bool = False

    @property
    def is_host(self) -> bool:
        return self.kind == Kind.HOST


@dataclass
class Assign:
    target: str
    value: Node
    pos: Position | None = None
    #: "state" | "param" | "grad" | "temp" | "host_state" | "accumulate" (``acc += value``: a
    #: per-tensor value summed over every parameter of the step) | "global" (finalize: a group key)
    role: str = "temp"


@dataclass
class If:
    cond: Node
    then: list[Stmt]
    orelse: list[Stmt]
    pos: Position | None = None


Stmt = Assign | If


@dataclass
class StateDecl:
    name: str
    kind: Kind
    init: Any  # "zeros" | "ones" | "absent" | "param" (a copy of it) | float | ("hyper", name)
    #          | "coded" (a tensor a coded state's codec stores, written with it: ``codec_rules``)
    dtype: str  # param | float32 | float64 | default | bits (a boolean, packed 8 per uint8 along the last dim)
    cond: Node | None = None
    doc: str = ""
    #: (per-row factor, per-column factor, sign state or None): how feature ``factored`` stores it
    factored: tuple[str, str, str | None] | None = None
    #: (condition, dtype): the dtype instead of ``dtype`` for parameters where the condition holds
    dtype_when: tuple[Node, str] | None = None
    #: init "param" of an all-zero parameter stores a 0-d zero instead (adv_optm's Prodigy ``p0``)
    scalar_if_zero: bool = False
    #: (condition, dtype) rules before ``dtype_when``, the first that holds wins (feature
    #: ``state_precision``: a codec's storage dtype, or float32 for tensors it leaves alone)
    dtype_rules: list[tuple[Node, str]] = field(default_factory=list)
    #: elements per block of a per-block state (Kind.BLOCK)
    block: int | None = None
    #: the matrix view a per-row / per-column state's kind refers to, where not the one its
    #: parameter is stepped as: ``"square"``, the closest-to-square ``(d1, d2)`` of the flat
    #: parameter (read and written by the ``square_*`` ops)
    view: str | None = None
    #: feature ``factored``'s ``factored_2nd`` path keeps this state's factors on the square view
    #: also for parameters stepped as another matrix view (``factored: {..., any_view: true}``)
    factored_any_view: bool = False
    #: (condition, codec name) rules, the first that holds wins: a read-only coded state, its
    #: ``init`` encoded by the codec at allocation into every tensor the codec stores (keys
    #: ``optgen.ir.codecs.stored_names``, each declared with init "coded"), decoded where the step
    #: reads it (feature centered_wd's blockwise anchors)
    codec_rules: list[tuple[Node, str]] = field(default_factory=list)


@dataclass
class GlobalDecl:
    """An optimizer-wide host value: kept in every param group (as adv_optm keeps Prodigy's ``d``),
    read like a hyperparameter, written only by the program's ``finalize`` statements."""

    name: str
    init: Node  # a host expression of the group's hyperparameters, evaluated when a group is added
    doc: str = ""


@dataclass
class AccumulatorDecl:
    """An optimizer-wide device scalar (torch's default dtype) that the parameters' ``acc += value``
    statements sum into during one step, in parameter order; ``finalize`` reads it (one host
    transfer per step for all of them)."""

    name: str
    init: Node  # a host expression of group 0's hyperparameters and globals, at the start of a step
    doc: str = ""


@dataclass
class ReductionDecl:
    """An optimizer-wide device value the same step consumes (``reductions:``): computed as the
    step's first phase over every selected parameter of every group, then read by the update of
    every parameter as a per-tensor value (node ``reduced``).

    ``over``: ``norm`` (torch.nn.utils.get_total_norm of the per-tensor values: each tensor's
    ``order``-norm, then the norm of those norms), ``sum``, ``max``, ``min`` (of each tensor's, then
    of those), ``kthvalue`` (the ``k``-th smallest element of the concatenation) or ``quantile``
    (torch.quantile of the concatenation at ``q``). With ``window`` (a window statistic), ``of``
    is an earlier reduction (node ``reduced``) and ``over`` (``mean``, ``std``, ``count``, ``sum``,
    ``max``, ``min``) reduces the finite values it took at the last ``window`` earlier steps.
    """

    name: str
    of: Node  # per-element or per-tensor value of one parameter
    over: str
    order: Node | None = None  # host expression (norm)
    k: Node | None = None  # host expression of hyperparameters, globals and ``count`` (kthvalue)
    q: Node | None = None  # host expression (quantile)
    select: Node | None = None  # per-parameter host condition: which parameters take part
    cond: Node | None = None  # host condition of group 0's hyperparameters: computed at all
    window: Node | None = None  # host expression: the number of earlier steps a window statistic reads
    #: first: the step's first phase, read by the update; post: computed after every parameter's
    #: update, read by the post-update statements (``Program.post``)
    phase: str = "first"
    doc: str = ""


@dataclass
class PublishedEntry:
    """A per-parameter entry of the published state dict that is not a state (a flag, a shape)."""

    name: str
    #: host expressions; several make a tuple (or a tensor of ``dtype``)
    values: list[Node]
    is_list: bool = False
    cond: Node | None = None
    dtype: str | None = None
    #: the value is the code book of the codec storing this state (``values`` empty)
    codebook: str | None = None


@dataclass
class PublishedLayout:
    """The published class's state-dict layout (``matches.state_dict``), lowered: applied by
    :mod:`optgen.runtime.published_layout` in ``state_dict()`` and ``load_state_dict``."""

    step: str = "tensor"  # tensor | int
    step_if: Node | None = None
    group: list[tuple[str, Node]] = field(default_factory=list)
    state: list[PublishedEntry] = field(default_factory=list)
    flat: list[str] = field(default_factory=list)
    #: per-row / per-column states saved with the reduced dim kept as size 1 ((*B, M, 1) / (*B, 1, N))
    keepdim: list[str] = field(default_factory=list)
    #: (state, bool mask state): saved as the 1-D vector of the masked elements
    masked: list[tuple[str, str]] = field(default_factory=list)
    master: str | None = None
    none_if_absent: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)
    #: (this class's state key, the published key)
    rename: list[tuple[str, str]] = field(default_factory=list)
    #: (published key of a nested dict, the published entries it holds)
    wrap: list[tuple[str, list[str]]] = field(default_factory=list)


@dataclass
class Program:
    """The lowered optimizer: declarations plus the ordered per-parameter step."""

    name: str
    class_name: str
    doc: str
    source: str
    sha256: str
    step_store: str  # tensor | none
    step_math: str  # float64 | tensor
    state_init: str  # lazy | eager
    hypers: list[Any]  # list[tuple[name, HyperparameterSpec]] in constructor order
    checks: list[tuple[Node, str]]
    state: list[StateDecl]
    body: list[Stmt]
    matches: Any = None
    features: list[str] = field(default_factory=list)
    #: ``(condition, shape)`` rules, the first whose per-parameter host condition holds wins: the
    #: runtime hands the step its parameter, gradient and per-element states as a 2-D view of their
    #: flat memory, ``"square"`` the closest-to-square ``(d1, d2)`` (feature ``factored``), ``"rows"``
    #: ``(shape[0], numel / shape[0])`` (Muon's matrices); per-row/per-column kinds and
    #: ``rows``/``cols`` then refer to it.
    matrix_views: list[tuple[Node, str]] = field(default_factory=list)
    #: the hyperparameter holding k of per-slice values (every k-th element), if the program has any
    slice_stride: str | None = None
    globals: list[GlobalDecl] = field(default_factory=list)
    accumulators: list[AccumulatorDecl] = field(default_factory=list)
    #: optimizer-wide values computed as the step's first phase and read by the same step
    reductions: list[ReductionDecl] = field(default_factory=list)
    #: host statements run once after every parameter of a step: read accumulators, write globals
    finalize: list[Stmt] = field(default_factory=list)
    #: the post-update phase: per-parameter statements run after every parameter of the step has
    #: been updated and the ``phase: post`` reductions computed over the updated values (before
    #: ``finalize``); AdamWPrune's masks from the stepped moments
    post: list[Stmt] = field(default_factory=list)
    #: the published class's state-dict layout, where it is not torch.optim's
    published: PublishedLayout | None = None
    #: the spec's declared ``roles:``: role -> the (target, position) of each statement it binds;
    #: a role not here is inferred from the dialect by the feature (not serialised: features only)
    roles: dict[str, list[tuple[str, Position | None]]] = field(default_factory=dict)
    #: the uses of blocks that declare features (``optgen.ir.lower.ScopeSite``), consumed by the
    #: features pass (not serialised)
    scopes: list[Any] = field(default_factory=list)
    #: names used around the body where it is a block's scope (a feature's temporaries avoid them)
    reserved: frozenset[str] = frozenset()

    def state_decl(self, name: str) -> StateDecl:
        for s in self.state:
            if s.name == name:
                return s
        raise KeyError(name)

    def copy(self, **changes: Any) -> Program:
        return replace(self, **changes)


def walk_nodes(node: Node):
    """Yield ``node`` and all its descendants, parents first."""
    yield node
    for a in node.args:
        yield from walk_nodes(a)


def walk_stmts(stmts: list[Stmt]):
    """Yield every statement, entering both branches of conditionals."""
    for s in stmts:
        yield s
        if isinstance(s, If):
            yield from walk_stmts(s.then)
            yield from walk_stmts(s.orelse)
