"""Every IR op and the facts the passes and backends ask about it, in one table.

``Node.op`` stays the op's name (a plain string in the IR and its serialized sidecars); ``Op``
names them, so ``node.op == Op.LERP`` compares names and a misspelt name is an AttributeError
instead of a comparison that is silently never true. ``Op`` is a plain namespace of strings, not
an :class:`~enum.Enum`: the host pass compares ops on every step, and an enum member's lookup
costs about 1 us on Python 3.11 against 0.1 us for a class attribute. Questions about an op
(``is it a reduction``, ``does a kernel compute it``) are answered by :data:`OPS`, not by lists
of names in each module.
"""

from __future__ import annotations

from dataclasses import dataclass

from optgen.ir.nodes import Kind


class Op:
    """The name of every IR op."""

    # leaves: no arguments, the value comes from ``attr``, the parameter or the runtime
    CONST = "const"
    VAR = "var"
    HYPER = "hyper"
    STEP = "step"
    META = "meta"
    INPUT = "input"
    HAS = "has"
    PARAM_ATTR = "param_attr"
    REDUCED = "reduced"
    UNKNOWN = "unknown"  # a temporary whose value a pass does not track (state_precision's analysis)
    # arithmetic (r*: reversed operands, a host value on the left of a device one)
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    POW = "pow"
    MOD = "mod"
    NEG = "neg"
    RSUB = "rsub"
    RDIV = "rdiv"
    RMOD = "rmod"
    SDIV = "sdiv"  # a host scalar truly divided by a device value
    ADDCMUL = "addcmul"
    ADDCDIV = "addcdiv"
    AXPY = "axpy"
    # comparisons and logic
    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    AND = "and"
    OR = "or"
    NOT = "not"
    WHERE = "where"
    IS_FLOAT32 = "is_float32"  # a host value that is a float32 0-d tensor (torch.optim's tensor lr)
    # elementwise functions
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    ABS = "abs"
    SIGN = "sign"
    EXP = "exp"
    LOG = "log"
    COS = "cos"
    SIN = "sin"
    FLOOR = "floor"
    RECIPROCAL = "reciprocal"
    ATAN2 = "atan2"
    MAXIMUM = "maximum"
    MINIMUM = "minimum"
    MAX = "max"
    MIN = "min"
    CLAMP = "clamp"
    LERP = "lerp"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    COPY = "copy"
    CONTIGUOUS = "contiguous"
    CAST = "cast"
    RAND_LIKE = "rand_like"
    STREAM_RAND = "stream_rand"  # adv_optm's per-device stream (stochastic sign)
    MAXABS_DIM = "maxabs_dim"  # max |x| over one dim, kept (3-D+ stochastic sign)
    ATAN = "atan"
    # reductions of the (shape[0], -1) matrix view along one of its dims, kept (SinkSGD)
    VIEWNORM = "viewnorm"
    VIEWMEAN = "viewmean"
    # alternating row / column normalisations of the (shape[0], -1) view against the parameter
    SINKHORN = "sinkhorn"
    ORTHOGRAD_ITERATIVE = "orthograd_iterative"
    STOCHASTIC_ROUND = "stochastic_round"
    # shape-changing ops with their own shape rules
    OUTER = "outer"
    STRIDED = "strided"
    # across views: per-row / per-column values of the closest-to-square (d1, d2) view of a
    # parameter stepped as another view (adv_optm's factored_2nd under Muon's (rows, -1) matrix)
    SQUARE_OUTER = "square_outer"  # (r, c, like): outer(r, c) of the square view, as like's (stepped) shape
    SQUARE_ROWSUM = "square_rowsum"  # sums over the rows of the square view of a per-element value
    SQUARE_COLSUM = "square_colsum"  # sums over the columns of the square view
    # reductions
    MATVEC = "matvec"
    MATVEC_T = "matvec_t"
    MV = "mv"  # W v of a 2-D W with torch.mv's rounding (adv_optm's spectral normalisation)
    MV_T = "mv_t"  # W^T u of a 2-D W with torch.mv's rounding
    ROWSUM = "rowsum"
    COLSUM = "colsum"
    SUM = "sum"
    SUMSQ = "sumsq"  # the triton plan's form of norm (the square root is taken afterwards)
    MEAN = "mean"
    NORM = "norm"
    MAXABS = "maxabs"
    VDOT = "vdot"
    DOT = "dot"
    NORMALIZE = "normalize"
    ROWNORM = "rownorm"
    COLNORM = "colnorm"
    ROWMAXABS = "rowmaxabs"
    COLMAXABS = "colmaxabs"
    MATMEAN = "matmean"
    # whole-matrix calls that every backend runs with torch (Muon's orthogonalisers)
    NEWTON_SCHULZ = "newton_schulz"
    CANS = "cans"
    LOW_RANK_NEWTON_SCHULZ = "low_rank_newton_schulz"
    LOW_RANK_CANS = "low_rank_cans"
    # state precision: a stored state's value decoded / a value encoded into its stored tensors
    DECODE = "decode"
    ENCODE = "encode"


@dataclass(frozen=True)
class OpInfo:
    """The facts about one op."""

    #: how many arguments the IR node has (min, max; max None: any number)
    arity: tuple[int, int | None]
    #: its result's shape follows a rule of its own: its arguments are not broadcast to its kind
    #: (reductions, whole-matrix calls, ``outer``, ``strided``, ``cast``)
    own_shape: bool = False
    #: the host pass (optgen.numerics.host.evaluate) computes it on host scalars
    host: bool = False
    #: a reduction: the kind it produces from its (first) argument
    reduces_to: Kind | None = None
    #: a reduction that reads per-element data (a full pass over the tensor)
    full_pass: bool = False
    #: a whole-matrix call no kernel computes: the runtime runs it with torch between passes
    call: bool = False
    #: reads or writes a state's stored (coded) tensors
    codec: bool = False


#: every op name
NAMES: tuple[str, ...] = tuple(v for k, v in vars(Op).items() if k.isupper())


def _table() -> dict[str, OpInfo]:
    leaf = OpInfo((0, 0), host=True)
    unary, binary = OpInfo((1, 1), host=True), OpInfo((2, 2), host=True)
    dev1, dev2 = OpInfo((1, 1)), OpInfo((2, 2))

    def red(arity: int, to: Kind | None, full: bool = True) -> OpInfo:
        return OpInfo((arity, arity), own_shape=True, reduces_to=to, full_pass=full)

    def call(arity: int) -> OpInfo:
        return OpInfo((arity, arity), own_shape=True, call=True)

    t: dict[str, OpInfo] = {
        **dict.fromkeys((Op.CONST, Op.VAR, Op.HYPER, Op.STEP, Op.META, Op.INPUT, Op.HAS, Op.PARAM_ATTR), leaf),
        Op.REDUCED: OpInfo((0, 0)),
        Op.UNKNOWN: OpInfo((0, 0)),
        **dict.fromkeys((Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MOD), binary),
        **dict.fromkeys((Op.RSUB, Op.RDIV, Op.RMOD, Op.SDIV), dev2),
        Op.NEG: unary,
        Op.ADDCMUL: OpInfo((4, 4)),
        Op.ADDCDIV: OpInfo((4, 4)),
        Op.AXPY: OpInfo((3, 3)),
        **dict.fromkeys((Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE), binary),
        Op.AND: OpInfo((2, None), host=True),
        Op.OR: OpInfo((2, None), host=True),
        Op.NOT: unary,
        Op.WHERE: OpInfo((3, 3), host=True),
        Op.IS_FLOAT32: unary,
        **dict.fromkeys((Op.SQRT, Op.ABS, Op.SIGN, Op.EXP, Op.LOG, Op.COS, Op.SIN, Op.FLOOR, Op.FLOAT32,
                         Op.FLOAT64), unary),
        **dict.fromkeys((Op.RSQRT, Op.RECIPROCAL, Op.COPY, Op.CONTIGUOUS), dev1),
        **dict.fromkeys((Op.ATAN2, Op.MAX, Op.MIN), binary),
        **dict.fromkeys((Op.MAXIMUM, Op.MINIMUM, Op.RAND_LIKE, Op.STREAM_RAND, Op.STOCHASTIC_ROUND), dev2),
        Op.MAXABS_DIM: OpInfo((2, 2), own_shape=True),
        Op.ATAN: dev1,
        **dict.fromkeys((Op.VIEWNORM, Op.VIEWMEAN), OpInfo((2, 2), own_shape=True)),
        Op.SINKHORN: OpInfo((4, 4), own_shape=True),
        Op.ORTHOGRAD_ITERATIVE: OpInfo((2, 2), own_shape=True),
        Op.CLAMP: OpInfo((3, 3)),
        Op.LERP: OpInfo((3, 3)),
        Op.CAST: OpInfo((2, 2), own_shape=True),  # the dtype of its second argument, the kind of its first
        Op.OUTER: OpInfo((2, 2), own_shape=True),  # per-row r times per-column c
        Op.STRIDED: OpInfo((2, 2), own_shape=True),  # (x, k): every k-th element, a per-slice value
        Op.SQUARE_OUTER: OpInfo((3, 3), own_shape=True),
        Op.SQUARE_ROWSUM: red(1, Kind.ROW),
        Op.SQUARE_COLSUM: red(1, Kind.COL),
        Op.MATVEC: red(2, Kind.ROW),
        Op.MATVEC_T: red(2, Kind.COL),
        Op.MV: red(2, Kind.ROW),
        Op.MV_T: red(2, Kind.COL),
        Op.ROWSUM: red(1, Kind.ROW),
        Op.COLSUM: red(1, Kind.COL),
        Op.SUM: red(1, Kind.TENSOR),
        Op.SUMSQ: red(1, Kind.TENSOR),
        Op.MEAN: red(1, Kind.TENSOR),
        Op.NORM: red(1, Kind.TENSOR),
        Op.MAXABS: red(1, Kind.TENSOR),
        Op.VDOT: red(2, Kind.TENSOR),
        Op.ROWNORM: red(1, Kind.ROW),
        Op.COLNORM: red(1, Kind.COL),
        Op.ROWMAXABS: red(1, Kind.ROW),
        Op.COLMAXABS: red(1, Kind.COL),
        # of per-row / per-column values: no pass over the elements
        Op.DOT: red(2, Kind.MATRIX, full=False),
        Op.MATMEAN: red(1, Kind.MATRIX, full=False),
        Op.NORMALIZE: red(1, None, full=False),  # a row/column vector over its own norm: the same kind
        Op.NEWTON_SCHULZ: call(6),
        Op.CANS: call(4),
        Op.LOW_RANK_NEWTON_SCHULZ: call(7),
        Op.LOW_RANK_CANS: call(5),
        Op.DECODE: OpInfo((0, 0), codec=True),
        Op.ENCODE: OpInfo((1, 2), codec=True),
    }
    missing = set(NAMES) - set(t)
    assert not missing and len(t) == len(NAMES), f"ops without facts: {sorted(missing)}"
    return t


#: op name -> its facts
OPS: dict[str, OpInfo] = _table()


def info(op: str) -> OpInfo:
    """The facts of the op named ``op`` (KeyError: not an IR op)."""
    return OPS[op]


def _where(**facts: object) -> frozenset[str]:
    return frozenset(o for o, i in OPS.items() if all(getattr(i, k) == v for k, v in facts.items()))


#: whole-matrix calls (Muon's orthogonalisers): a matrix plus host arguments, run with torch by every backend
CALLS = _where(call=True)
#: ops that reduce a larger kind into a smaller one (and normalize, which reads its vector's norm): they end a phase
REDUCTIONS = frozenset(o for o, i in OPS.items() if i.reduces_to is not None or o == Op.NORMALIZE)
#: reductions that read per-element data (a full pass over the tensor)
FULL_PASS_REDUCTIONS = _where(full_pass=True)
#: ops whose arguments are not broadcast to the result's kind
OWN_SHAPE = _where(own_shape=True)
#: what each reduction produces from its (first) argument
REDUCTION_RESULT = {o: i.reduces_to for o, i in OPS.items() if i.reduces_to is not None}


_SPECTRAL = "mv()/mv_t() (torch.mv's products: spectral normalisation's power iteration)"
#: ops no triton kernel computes yet, and why: a path that reads one is refused (at construction
#: where a parameter takes it, see optgen.runtime.base)
_SQUARE = ("the closest-to-square view's factors of a parameter stepped as another view (adv_optm's "
           "factored_2nd under Muon's (rows, -1) matrix)")
NOT_IN_TRITON: dict[str, str] = {Op.MV: _SPECTRAL, Op.MV_T: _SPECTRAL, Op.SQUARE_OUTER: _SQUARE,
                                 Op.SQUARE_ROWSUM: _SQUARE, Op.SQUARE_COLSUM: _SQUARE}
