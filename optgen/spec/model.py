"""The pydantic models of a spec: what a YAML file may say, with defaults and field checks.

Statements of the ``update:`` list are parsed separately (:mod:`optgen.spec.loader`), because
they need the position of every sub-expression.
"""

from __future__ import annotations

import keyword
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: Names with a fixed meaning inside update expressions.
RESERVED = {
    "param", "grad", "step", "numel", "ndim", "rows", "cols", "bf16", "dim0", "dim1", "big_dims", "square_rows",
    "square_cols", "true", "false", "True", "False",
}


#: Names a hyperparameter cannot take: the generated constructor's own arguments and the names it
#: calls, the generated module's globals, and the attributes of ``torch.optim.Optimizer`` (an
#: optimizer-wide hyperparameter is an attribute of the optimizer). tests/test_hostile_specs.py
#: checks this list against the runtime's classes.
RESERVED_HYPERPARAMETERS = {
    "self", "params", "backend", "super", "defaults", "state", "param_groups",
    "F", "torch", "GeneratedOptimizer", "program_from_data", "annotations", "inf", "nan",
    "step", "zero_grad", "state_dict", "load_state_dict", "add_param_group", "profile_hook_step",
    "register_step_pre_hook", "register_step_post_hook", "register_state_dict_pre_hook",
    "register_state_dict_post_hook", "register_load_state_dict_pre_hook",
    "register_load_state_dict_post_hook", "OptimizerPreHook", "OptimizerPostHook",
}

#: Names a spec's class cannot take: the globals of the modules it is rendered into.
RESERVED_CLASS_NAMES = {
    "F", "torch", "triton", "tl", "L", "GeneratedOptimizer", "program_from_data", "annotations", "inf", "nan",
    "KERNELS", "PLAN", "UNSUPPORTED",
}

#: The dtype names a ``type: dtype`` default may take (rendered as ``torch.<name>``).
TORCH_DTYPES = {
    "float16", "float32", "float64", "bfloat16", "half", "float", "double",
    "float8_e4m3fn", "float8_e5m2", "int8", "uint8", "int16", "int32", "int64",
}

#: Longest spec or class name (its files are ``<name>_triton.py`` and cached ``<name>_<hash>.py``).
MAX_NAME = 100


def _check_ident(name: str, what: str) -> str:
    if not isinstance(name, str) or not IDENT.match(name) or keyword.iskeyword(name):
        raise ValueError(f"{what} {name!r} is not a valid identifier")
    if len(name) > MAX_NAME:
        raise ValueError(f"{what} {name[:20]!r}... is longer than {MAX_NAME} characters")
    if name.startswith("_"):
        raise ValueError(f"{what} {name!r}: names starting with '_' are reserved for optgen")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class HyperparameterSpec(_Strict):
    """A constructor argument and per-group hyperparameter."""

    default: Any = None
    type: Literal["float", "int", "bool", "any", "dtype"] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: float | None = None
    max_exclusive: float | None = None
    as_: list[str] | None = Field(default=None, alias="as")
    doc: str = ""
    keyword_only: bool = False
    #: False: not a constructor argument; the default is stored in every param group.
    constructor: bool = True
    #: False: an optimizer-wide setting stored on the optimizer, not in param groups.
    per_group: bool = True
    #: Whether a 1-element tensor is accepted (torch accepts a tensor lr).
    tensor_ok: bool = False
    #: The dtypes a tensor value may have (None: any): published code that computes with a tensor
    #: value in its own dtype (torch.optim.Adafactor's lr) is reproduced for these, the others refused.
    tensor_dtypes: list[str] | None = None
    #: The ValueError message for an out-of-range value; ``{value}`` and ``{index}`` are filled in.
    message: str | None = None
    #: The only values accepted (a published argument whose other values are not implemented yet).
    choices: list[Any] | None = None
    #: None is accepted too (a number or "not given": conditions test ``name == None``).
    nullable: bool = False
    #: Every group steps with param_groups[0]'s value (adv_optm's Prodigy reads its betas there).
    first_group: bool = False
    #: A torch dtype that must be every parameter's dtype (adams' ``master_dtype``: a separate master
    #: copy in another dtype is not implemented, so another value is refused, never ignored).
    param_dtype: bool = False
    #: ``finalize:`` may assign it: the statement runs for every param group with that group's
    #: values (published code that writes ``group['lr']``, AdamWPrune's SPAM warm-up)
    written: bool = False

    @field_validator("as_")
    @classmethod
    def _as_names(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if len(v) < 2:
                raise ValueError("'as' needs at least two names")
            for n in v:
                _check_ident(n, "name")
        return v

    @model_validator(mode="after")
    def _typed(self) -> HyperparameterSpec:
        kind = self.type or self.inferred_type()
        if self.tensor_dtypes is not None:
            if not self.tensor_ok:
                raise ValueError("tensor_dtypes needs tensor_ok: true")
            for d in self.tensor_dtypes:
                if d not in ("float16", "bfloat16", "float32", "float64"):
                    raise ValueError(f"tensor_dtypes: {d!r} is not a floating torch dtype name "
                                     "(float16, bfloat16, float32 or float64)")
        if self.as_ is not None:
            if not isinstance(self.default, (list, tuple)) or len(self.default) != len(self.as_):
                raise ValueError(f"default must be a list of {len(self.as_)} values to match 'as'")
            values = list(self.default)
        else:
            values = [self.default]
        for v in values:
            if v is None and (self.as_ is None or self.nullable) and kind in ("float", "int"):
                continue  # an optional number: None means "not given" (conditions test `== None`)
            if kind == "float" and not (isinstance(v, (int, float)) and not isinstance(v, bool)):
                raise ValueError(f"default {v!r} is not a number")
            if kind == "int" and not (isinstance(v, int) and not isinstance(v, bool)):
                raise ValueError(f"default {v!r} is not an integer")
            if kind == "bool" and not isinstance(v, bool):
                raise ValueError(f"default {v!r} is not true or false")
            if kind == "dtype" and v is not None and v not in TORCH_DTYPES:
                raise ValueError(f"default {v!r} is not a torch dtype name "
                                 f"(one of {', '.join(sorted(TORCH_DTYPES))})")
        return self

    def inferred_type(self) -> str:
        if self.type:
            return self.type
        first = self.default[0] if isinstance(self.default, (list, tuple)) and self.default else self.default
        if isinstance(first, bool):
            return "bool"
        if isinstance(first, (int, float)):
            return "float"
        return "any"


class FactoredStateSpec(_Strict):
    """How feature ``factored`` stores a per-element state: two rank-1 factors (+ a 1-bit sign)."""

    row: str  # the per-row factor's state key (adv_optm: mu_<x>_nmf)
    col: str  # the per-column factor's state key (adv_optm: mv_<x>_nmf)
    #: the packed sign's state key, for a signed state (a first moment); omit for non-negative ones
    sign: str | None = None
    #: with ``factored_2nd``, factor it on the closest-to-square view also for parameters the spec
    #: steps as another matrix view (adv_optm's AdaMuon factors v of the orthogonalised (rows, -1)
    #: matrix on the square view); otherwise those parameters keep it dense
    any_view: bool = False

    @field_validator("row", "col", "sign")
    @classmethod
    def _idents(cls, v: str | None) -> str | None:
        return v if v is None else _check_ident(v, "state name")


class StateSpec(_Strict):
    """A state buffer kept per parameter."""

    #: slice: every k-th element of the flattened parameter, k the spec's ``slice_stride``
    kind: Literal["element", "row", "col", "matrix", "tensor", "host", "slice"] = "element"
    #: zeros | ones | absent (created by its first assignment) | param (a copy of the parameter,
    #: or of its slice) | a number | a hyperparameter name | random_subset(HYPER) (a bool mask with
    #: int(HYPER * numel) true elements at torch.randperm(numel)'s first positions)
    init: float | int | str = "zeros"
    #: param: the parameter's dtype; default: torch's default dtype (used for host scalars)
    #: bool: a mask (its reads are elementwise conditions, as comparisons are)
    dtype: Literal["param", "float32", "float64", "default", "bool"] = "param"
    if_: str | None = Field(default=None, alias="if")
    doc: str = ""
    #: its factored form, used by feature ``factored`` (per-element states only)
    factored: FactoredStateSpec | None = None
    #: with init ``param``: an all-zero parameter stores a 0-d zero (adv_optm's Prodigy ``p0``)
    scalar_if_zero: bool = False


class GlobalSpec(_Strict):
    """An optimizer-wide host value kept in every param group, written by ``finalize`` (never
    written there: a construction-time constant)."""

    #: a host expression of the group's hyperparameters (evaluated when the group is added)
    init: float | int | str
    doc: str = ""


class AccumulatorSpec(_Strict):
    """A device scalar (torch's default dtype) summed over all parameters during a step
    (``name += value``), in parameter order."""

    #: a host expression of group 0's hyperparameters and globals, evaluated as each step begins
    init: float | int | str = 0.0
    doc: str = ""


class ReductionSpec(_Strict):
    """An optimizer-wide value the same step consumes: a reduction over every selected parameter of
    the optimizer, computed as the step's first phase (see :class:`optgen.ir.nodes.ReductionDecl`)."""

    #: the per-element (or per-tensor) value of one parameter: an expression of param, grad, its
    #: states and hyperparameters (and earlier reductions)
    of: str
    over: Literal["norm", "sum", "max", "min", "kthvalue", "quantile", "mean", "std", "count"]
    #: norm: its order (a number or a host expression; inf for the max norm)
    order: float | int | str = 2.0
    #: kthvalue: k, a host expression of hyperparameters, globals and ``count`` (the number of
    #: elements reduced); k < 1 gives -inf, k > count +inf
    k: float | int | str | None = None
    #: quantile: q in [0, 1]
    q: float | int | str | None = None
    #: per-parameter host condition: which parameters take part (default: all)
    select: str | None = None
    #: a window statistic: ``of`` names an earlier reduction and this one reduces (mean, std,
    #: count, sum, max, min) the finite values that reduction took at the last ``window`` earlier
    #: steps (a host expression of group 0's hyperparameters), kept on the device
    window: int | str | None = None
    #: host condition of group 0's hyperparameters: whether it is computed at all this step
    if_: str | None = Field(default=None, alias="if")
    doc: str = ""


class MatrixViewSpec(_Strict):
    """Step the parameters that meet a condition as a 2-D view of their flat memory."""

    if_: str = Field(alias="if")
    #: rows: (shape[0], numel / shape[0]), as Muon flattens a conv kernel; square: closest to square
    shape: Literal["rows", "square"] = "rows"


class StepSpec(_Strict):
    """How the per-parameter step counter is kept."""

    #: tensor: a 0-d CPU tensor of the default dtype under state key 'step' (torch.optim's way)
    store: Literal["tensor", "none"] = "tensor"
    #: float64: host scalars are Python floats (step.item()); tensor: 0-d tensor maths in the
    #: step's dtype, as code that writes ``beta1 ** step`` with a tensor step computes them.
    math: Literal["float64", "tensor"] = "float64"


class CheckSpec(_Strict):
    """A constructor-time check on hyperparameters."""

    check: str
    message: str


class PublishedEntrySpec(_Strict):
    """One per-parameter entry of the published state dict that is not a declared state."""

    #: a host expression (of hyperparameters, facts about the parameter and ``has(state)``), or a list
    #: of them (saved as a tuple, or as a tensor of ``dtype``)
    value: str | list[str] | None = None
    #: instead of ``value``: the code book (``qmap``) of the codec that stores this state for the
    #: parameter (feature state_precision; bitsandbytes' ``qmap1``/``qmap2``)
    codebook: str | None = None
    #: saved only for parameters meeting this host condition
    if_: str | None = Field(None, alias="if")
    #: save the value as a tensor of this dtype on the parameter's device (adv_optm's ``shifter``)
    dtype: str | None = None


class PublishedStateDictSpec(_Strict):
    """How the published class's state dict differs from this class's own (``matches.state_dict``).

    ``state_dict()`` writes this layout and ``load_state_dict`` accepts it (and this class's own).
    """

    #: the per-parameter ``step`` as the published class keeps it: a 0-d tensor (torch's) or a Python int
    step: Literal["tensor", "int"] = "tensor"
    #: the published class keeps a step only for parameters meeting this host condition
    step_if: str | None = None
    #: group entries that are not hyperparameters: name -> host expression of hyperparameters
    group: dict[str, str] = Field(default_factory=dict)
    #: per-parameter entries that are not states (flags, shapes): name -> expression or entry
    state: dict[str, str | PublishedEntrySpec] = Field(default_factory=dict)
    #: element states the published class keeps flat, ``(numel,)``, one process's whole shard
    flat: list[str] = Field(default_factory=list)
    #: per-row / per-column states the published class keeps with the reduced dim as a size-1 dim:
    #: per-row ``(*B, M)`` saved as ``(*B, M, 1)``, per-column ``(*B, N)`` as ``(*B, 1, N)`` (torch's Adafactor)
    keepdim: list[str] = Field(default_factory=list)
    #: per-element states the published class keeps as 1-D vectors of the elements a bool mask state
    #: selects (pytorch-optimizer's SPAM): state -> mask state
    masked: dict[str, str] = Field(default_factory=dict)
    #: the published key of a flat copy of the parameter (a master copy): this class steps the
    #: parameter itself
    master: str | None = None
    #: states the published class saves as None where this class keeps none
    none_if_absent: list[str] = Field(default_factory=list)
    #: per-group hyperparameters the published class keeps as attributes of the optimizer, not in
    #: its param groups (adv_optm 2.2.3's flags): its state dicts lack them, so a load of one keeps
    #: this optimizer's own values instead of taking the defaults
    attributes: list[str] = Field(default_factory=list)
    #: states the published class keeps under another key: this class's name -> the published one
    #: (bitsandbytes' ``absmax1`` for ``state1_absmax``)
    rename: dict[str, str] = Field(default_factory=dict)
    #: per-parameter entries (published names) the published class nests in a dict under one key:
    #: that key -> the entries (bitsandbytes' ``__bnb_optimizer_quant_state__``)
    wrap: dict[str, list[str]] = Field(default_factory=dict)


class MatchSpec(_Strict):
    """The published implementation a spec reproduces."""

    package: str
    class_: str = Field(alias="class")
    #: our argument name -> theirs; null: not passed to the published class
    arguments: dict[str, str | None] = Field(default_factory=dict)
    #: hyperparameter settings (our names) that the equivalence tests run
    settings: list[dict[str, Any]] = Field(default_factory=lambda: [{}])
    #: the published constructor argument that must equal the parameters' dtype (adams' master_dtype)
    dtype_argument: str | None = None
    #: the published state-dict layout, where it is not this class's own (torch.optim's)
    state_dict: PublishedStateDictSpec | None = None
    notes: str = ""
    #: the model parameters the tests hand both classes: "matrices" where the published class refuses
    #: any other (torch.optim.Muon: 2-D only), "nonempty" where it fails on empty ones (torch.optim.Adafactor
    #: divides by numel ** 0.5); the others are left untouched
    parameters: Literal["all", "matrices", "nonempty"] = "all"

    @field_validator("package")
    @classmethod
    def _pinned(cls, v: str) -> str:
        if "==" not in v:
            raise ValueError(f"package {v!r} must be pinned as name==version")
        return v


class SpecModel(_Strict):
    """A whole spec, before its update statements are parsed."""

    name: str
    class_: str = Field(alias="class")
    doc: str = ""
    extends: str | None = None
    matches: MatchSpec | None = None
    #: the published state-dict layout of a class whose equivalence tests are not ``matches:``'
    #: (bitsandbytes' 8-bit classes: tests/test_quant_published.py)
    state_dict: PublishedStateDictSpec | None = None
    step: StepSpec = StepSpec()
    state_init: Literal["lazy", "eager"] = "lazy"
    #: named host expressions of hyperparameters and parameter facts, usable wherever those are
    facts: dict[str, str] = Field(default_factory=dict)
    #: parameters meeting its condition are stepped as a matrix (per-row values are per shape[0])
    matrix_view: MatrixViewSpec | None = None
    constructor_order: list[str] | None = None
    #: the hyperparameter k of per-slice values (``strided(x)`` and ``kind: slice`` states)
    slice_stride: str | None = None
    hyperparameters: dict[str, HyperparameterSpec] = Field(default_factory=dict)
    globals: dict[str, GlobalSpec] = Field(default_factory=dict)
    accumulators: dict[str, AccumulatorSpec] = Field(default_factory=dict)
    #: optimizer-wide values computed as the step's first phase and read by the same step
    reductions: dict[str, ReductionSpec] = Field(default_factory=dict)
    checks: list[CheckSpec] = Field(default_factory=list)
    features: list[str] = Field(default_factory=list)
    #: what features rewrite, by role: ``role: name`` (the one statement assigning ``name``),
    #: ``name#k`` (its k-th assignment in source order) or a list of those (a role on several paths)
    roles: dict[str, str | list[str]] = Field(default_factory=dict)
    state: dict[str, StateSpec] = Field(default_factory=dict)
    update: list[Any]
    #: host statements after every parameter of a step: read accumulators, assign globals
    finalize: list[Any] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not isinstance(v, str) or not re.match(r"^[a-z][a-z0-9_]*$", v):
            raise ValueError(f"name {v!r} must be lower_snake_case")
        if len(v) > MAX_NAME:
            raise ValueError(f"name {v[:20]!r}... is longer than {MAX_NAME} characters")
        if keyword.iskeyword(v) or keyword.issoftkeyword(v):
            raise ValueError(f"name {v!r} is a Python keyword: its module could not be imported by name")
        if v.endswith("_triton"):
            raise ValueError(f"name {v!r}: the suffix '_triton' names the kernel module of spec {v[:-7]!r}")
        if v.endswith("_ir"):
            raise ValueError(f"name {v!r}: the suffix '_ir' names the program-data module of spec {v[:-3]!r}")
        return v

    @field_validator("class_")
    @classmethod
    def _class(cls, v: str) -> str:
        _check_ident(v, "class name")
        if v in RESERVED_CLASS_NAMES:
            raise ValueError(f"class name {v!r} is a name the generated module uses")
        return v

    @field_validator("hyperparameters", "state", "facts", "globals", "accumulators", "reductions")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for n in v:
            _check_ident(n, "name")
            if n in RESERVED:
                raise ValueError(f"'{n}' is reserved")
        return v

    @field_validator("hyperparameters", "globals")  # globals live in param groups too
    @classmethod
    def _hyper_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for n in v:
            if n in RESERVED_HYPERPARAMETERS:
                raise ValueError(f"'{n}' is reserved: the generated optimizer uses this name")
        return v
