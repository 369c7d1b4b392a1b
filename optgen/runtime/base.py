"""The one hand-written base class of every generated optimizer.

Generated classes only declare their constructor signature and point at their IR program and
their generated multi-tensor step function; everything torch users rely on (param groups,
``add_param_group``, ``zero_grad``, closures, ``state_dict``/``load_state_dict``, LR schedulers,
hooks) comes from :class:`torch.optim.Optimizer` plus the code here.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from optgen.ir.codecs import PACKED_UINT4, codec_for, codecs_of, stored_names
from optgen.ir.nodes import If, Kind, Program, StateDecl, walk_nodes
from optgen.ir.ops import Op
from optgen.numerics import stochastic
from optgen.numerics.dtypes import storage_dtype
from optgen.numerics.host import HostContext, evaluate, run_host_block
from optgen.numerics.matrix_view import decl_view, packed_shape, view_shape
from optgen.runtime import clipping, published_layout, reductions, sharding, zero1
from optgen.runtime.executors import executor_for
from optgen.runtime.kourkoutas import R_EMA
from optgen.runtime.state_alloc import coded_shapes, new_coded_state, new_state, state_codec, state_shape
from optgen.spec.values import validate_hyperparameter as _validate_hyper

BACKENDS = ("auto", "triton", "torch", "compiled", "reference")


class GeneratedOptimizer(torch.optim.Optimizer):
    """Base of all optgen-generated optimizers.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        hyperparameters: constructor values by published name (filled in by the generated class).
        backend: ``"auto"`` (triton on CUDA; compiled on CPU where inductor finds a C++ compiler,
            else torch with a warning; torch elsewhere), ``"triton"`` (fused multi-tensor
            Triton kernels), ``"torch"`` (generated multi-tensor torch code), ``"compiled"`` (that
            code compiled by torch.compile/inductor, one fused loop per tensor; optgen.runtime.compiled)
            or ``"reference"`` (the IR interpreter, one parameter at a time).
    """

    _program: ClassVar[Program]
    _device_step: ClassVar[Callable[..., None]]
    _triton_module: ClassVar[str]

    def __init__(self, params: Iterable[Any], hyperparameters: dict[str, Any], *, backend: str = "auto"):
        prog = self._program
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        self.backend = backend
        self._triton = None
        specs = dict(prog.hypers)
        defaults: dict[str, Any] = {}
        for name, h in prog.hypers:
            value = hyperparameters.get(name, h.default) if h.constructor else h.default
            if h.as_ is not None and isinstance(value, (list, tuple)):
                value = tuple(map(_to_scalar, value))  # tensor betas as 0-d tensors, as torch.optim.Adam
            _validate_hyper(name, h, value)
            if h.per_group:
                defaults[name] = value
            else:
                setattr(self, name, value)
        unknown = set(hyperparameters) - set(specs)
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected arguments: {', '.join(sorted(unknown))}")
        self._run_checks(defaults)
        #: adams-torch's ZeRO layout when the spec has a process group of several ranks
        self._zero = _flat_group(self) if "process_group" in specs else None
        zero1.refuse_self_sharded(self)
        super().__init__(params, defaults)
        if self.backend == "auto":
            self.backend = _auto_backend(self.param_groups, self._zero is None)
        elif self.backend == "triton":
            _refuse_without_kernels(type(self).__name__, self._triton_module)
        self._init_transient()
        if "stochastic_rounding" in prog.features:
            # adv_optm re-seeds its per-device generator at every construction with bf16 params
            stochastic.reseed({p.device for g in self.param_groups for p in g["params"]
                               if p.dtype == torch.bfloat16 and g.get("stochastic_rounding")})
        zero1.attach(self)  # as ZeroRedundancyOptimizer's local optimizer: refusals, raw loaded states
        if self.backend == "triton":
            self._refuse_triton_ops()

    def _refuse_triton_ops(self) -> None:
        """Refuse, at construction, a parameter whose path reads an op no triton kernel computes
        (:data:`optgen.ir.ops.NOT_IN_TRITON`): its static conditions decided, the others both ways."""
        from optgen.ir.ops import NOT_IN_TRITON

        def reached(stmts, ctx) -> str | None:
            for s in stmts:
                if isinstance(s, If):
                    try:
                        branches = [s.then if evaluate(s.cond, ctx) else s.orelse]
                    except Exception:  # a value of the step: either branch may run
                        branches = [s.then, s.orelse]
                    for b in branches:
                        why = reached(b, ctx)
                        if why is not None:
                            return why
                    continue
                if s.value.is_host:  # the conditions' host values (static ones decide branches)
                    try:
                        ctx.env[s.target] = evaluate(s.value, ctx)
                    except Exception:
                        ctx.env.pop(s.target, None)
                    continue
                for n in walk_nodes(s.value):
                    if n.op in NOT_IN_TRITON:
                        return NOT_IN_TRITON[n.op]
            return None

        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                ctx = HostContext(group, p, self.state.get(p, {}), tensor_math=False)
                why = reached(self._program.body, ctx)
                if why is not None:
                    raise RuntimeError(f"{type(self).__name__}(backend='triton'): param_groups[{gi}] "
                                       f"(a parameter of shape {tuple(p.shape)}) takes {why}, which triton kernels "
                                       "do not compute yet; use backend='torch' or 'reference'")

    #: attributes a copy (pickle, ``copy.deepcopy``) rebuilds instead of copying: the triton runner
    #: (compiled kernels), caches keyed by ``id()`` of parameters, one step's partial sums and
    #: tables derived from the program
    _TRANSIENT: ClassVar[tuple[str, ...]] = (
        "_triton", "_kourkoutas", "_first_group", "_global_state_conds", "_prune_empty",
        "_parts", "_part_vectors", "_positions", "_position_index", "_layouts", "_zero", "_executors",
        "_zero1_pool", "_zero1_layers",
    )

    def _init_transient(self) -> None:
        """Set up what :attr:`_TRANSIENT` names from the program and the current param groups."""
        prog = self._program
        self._triton = None
        #: the step's backends (optgen.runtime.executors), by (backend, sharded), made on first use
        self._executors: dict[tuple[str, bool], Any] = {}
        self._layouts: dict[int, sharding.Layout] = {}  # how each DTensor parameter is stepped
        self._zero = _flat_group(self) if any(n == "process_group" for n, _ in prog.hypers) else None
        self._kourkoutas = None
        #: hyperparameters every group reads from group 0 (``first_group``)
        self._first_group = [n for n, h in prog.hypers if h.first_group]
        #: states whose condition reads a global, and whether it also reads parameter facts
        names = {g.name for g in prog.globals}
        self._global_state_conds = [
            (d, any(n.op in (Op.META, Op.HAS, Op.PARAM_ATTR) for n in walk_nodes(d.cond)))
            for d in prog.state
            if d.cond is not None and any(n.op == Op.HYPER and n.attr[0] in names for n in walk_nodes(d.cond))
        ]
        #: a step may leave a parameter without any state (SGD without momentum): torch.optim then
        #: keeps no entry for it in ``self.state``
        self._prune_empty = prog.step_store != "tensor" and all(d.init == "absent" or d.cond is not None
                                                                 for d in prog.state)
        #: one step's contributions to the program's accumulators, by parameter position
        self._parts: dict[str, dict[int, list[Any]]] = {}
        self._part_vectors: dict[str, torch.Tensor] = {}  # the triton backend's, position-indexed
        self._positions: dict[int, int] | None = None
        self._position_index: dict[tuple[int, ...], torch.Tensor] = {}  # the triton backend's
        if "kourkoutas_beta" in prog.features and any(g.get("kourkoutas_beta") for g in self.param_groups):
            from optgen.runtime.kourkoutas import Kourkoutas

            self._kourkoutas = Kourkoutas(self, self.param_groups[0].get("kourkoutas_warmup", "blend"))

    # -- groups and validation ---------------------------------------------------------------
    def _run_checks(self, group: dict[str, Any]) -> None:
        ctx = HostContext(group, torch.empty(0), {}, tensor_math=False)
        for node, message in self._program.checks:
            if not evaluate(node, ctx):
                raise ValueError(self._check_message(message, group))

    def _check_message(self, message: str, group: dict[str, Any]) -> str:
        """A check's message with ``{name}`` filled in from the group (hyperparameters and the
        names their ``as:`` pairs give), as torch's messages quote the values they refuse."""
        values: dict[str, Any] = {}
        for name, h in self._program.hypers:
            v = group.get(name)
            values[name] = v
            if h.as_ and isinstance(v, (tuple, list)):
                values.update(zip(h.as_, v))
        try:
            return message.format_map(values)
        except (KeyError, IndexError, ValueError, AttributeError):
            return message  # not a template (a literal brace): as written

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # torch raises its own error for a set
            params = param_group["params"] = list(params)
            seen: dict[int, int] = {}
            for i, p in enumerate(params):
                if id(p) in seen:
                    raise ValueError(
                        f"params: param group {len(self.param_groups)} lists the same parameter twice "
                        f"(positions {seen[id(p)]} and {i}, shape {tuple(getattr(p, 'shape', ()))}); list each parameter once"
                    )
                seen[id(p)] = i
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name, h in self._program.hypers:
            if h.per_group and name in param_group:
                if h.as_ is not None and isinstance(group[name], list):
                    group[name] = tuple(group[name])
                _validate_hyper(name, h, group[name])
            if h.param_dtype:
                _require_param_dtype(name, group[name] if h.per_group else getattr(self, name), group["params"])
        self._run_checks(group)
        self._init_globals(group)
        if self._program.state_init == "eager":
            for p in group["params"]:
                if not self.state.get(p):
                    self._init_state(p, group)

    def _init_globals(self, group: dict[str, Any]) -> None:
        """Optimizer-wide values (Prodigy's ``d``) start in each group from its hyperparameters,
        those marked ``first_group`` taken from group 0 as the step reads them (adv_optm's latched betas)."""
        first = self.param_groups[0] if self.param_groups else group
        values = {**group, **{n: first[n] for n, h in self._program.hypers if h.first_group and n in first}}
        for g in self._program.globals:
            if g.name not in group:
                group[g.name] = evaluate(g.init, HostContext(values, torch.empty(0), {}, tensor_math=False))

    def _stepping_group(self, gi: int, group: dict[str, Any]) -> dict[str, Any]:
        """The values a group steps with: hyperparameters marked ``first_group`` come from group 0."""
        if gi == 0 or not self._first_group:
            return group
        first = self.param_groups[0]
        return {**group, **{n: first[n] for n in self._first_group}}

    # -- optimizer-wide accumulators and the end of a step ------------------------------------
    # Contributions are kept per parameter and summed at the end of the step in parameter order,
    # whatever order the parameters were stepped in (buckets, or the fused backward pass's hooks):
    # the same sums, bit for bit, as adv_optm's step() adds them.
    def _position(self, p: torch.Tensor) -> int:
        if self.__dict__.get("_positions") is None or id(p) not in self._positions:  # (eager states: before _init_transient)
            self._positions = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        return self._positions[id(p)]

    def _accumulate(self, params: list[torch.Tensor], parts: dict[int, list[tuple[str, Any]]]) -> None:
        """Keep one step's per-parameter contributions (0-d tensors) until :meth:`finish_step`."""
        for p in params:
            for name, value in parts.get(id(p), ()):
                self._parts.setdefault(name, {}).setdefault(self._position(p), []).append(value)

    def _accumulate_vector(self, params: list[torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
        """The triton backend's contributions: one device vector per accumulator, in ``params`` order."""
        if not sums:
            return
        key = tuple(map(id, params))
        index = self._position_index.get(key)
        if index is None:  # built once per parameter list (a group, or one parameter when fused)
            index = torch.tensor([self._position(p) for p in params], dtype=torch.int64).to(params[0].device)
            self._position_index[key] = index
        n = sum(len(g["params"]) for g in self.param_groups)
        for name, values in sums.items():
            buf = self._part_vectors.get(name)
            if buf is None or buf.numel() != n:
                buf = self._part_vectors[name] = torch.zeros(n, dtype=torch.float32, device=params[0].device)
            buf.index_copy_(0, index, values.to(torch.float32))

    def _accumulator_sums(self, device: torch.device) -> dict[str, torch.Tensor]:
        pool = self.__dict__.get("_zero1_pool")
        if pool is not None:  # ZeRO-1's local optimizer: every rank's contributions (optgen.runtime.zero1)
            self._parts, self._part_vectors = pool.gather(self, self._parts, self._part_vectors)
        ctx = HostContext(self.param_groups[0], torch.empty(0), {}, tensor_math=False)
        acc = {}
        for a in self._program.accumulators:
            # torch's default dtype, as adv_optm creates them with torch.tensor(float)
            t = torch.tensor(float(evaluate(a.init, ctx)), dtype=torch.get_default_dtype(), device=device)
            for pos in sorted(self._parts.get(a.name, {})):
                for value in self._parts[a.name][pos]:
                    t.add_(value)
            if a.name in self._part_vectors:
                t.add_(self._part_vectors[a.name].sum())
            acc[a.name] = t
        self._parts = {}
        for buf in self._part_vectors.values():
            buf.zero_()
        return acc

    @torch.no_grad()
    def finish_step(self) -> None:
        """End a step: run the program's ``finalize`` statements (Prodigy's ``d`` update) once.

        :meth:`step` calls it; the fused backward pass calls it when the backward pass ends. Call
        it yourself after stepping parameters one by one with :meth:`step_parameter` (adv_optm's
        ``calculate_d()`` + ``init_step()``). Reads every accumulator in one host transfer.
        """
        prog = self._program
        if not prog.finalize:
            return
        first = self.param_groups[0]
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        acc = self._accumulator_sums(device)
        ctx = HostContext(dict(first), torch.empty(0), {}, tensor_math=False)
        if acc:
            ctx.env.update(zip(acc, torch.stack(list(acc.values())).tolist()))
        for name in run_host_block(prog.finalize, ctx, self.param_groups):
            for g in self.param_groups:
                g[name] = ctx.group[name]
        self._drop_states_out_of_condition()

    def _drop_states_out_of_condition(self) -> None:
        """Free states whose condition reads a global that no longer allows them (Prodigy's ``s`` and
        ``p0`` once ``prodigy_steps`` is reached)."""
        dropped = False
        for group in self.param_groups:
            for d, per_param in self._global_state_conds:
                keep = None if per_param else evaluate(d.cond, HostContext(group, torch.empty(0), {}, tensor_math=False))
                for p in group["params"]:
                    st = self.state.get(p)
                    if not st or d.name not in st:
                        continue
                    if keep is None:
                        ok = evaluate(d.cond, HostContext(group, p, {}, tensor_math=False, view=view_shape(self._program, p, group, st)))
                    else:
                        ok = keep
                    if not ok:
                        del st[d.name]
                        dropped = True
        if dropped and self._triton is not None:
            self._triton.invalidate()

    # -- state ---------------------------------------------------------------------------------
    def _layout(self, p: torch.Tensor, group: dict[str, Any]) -> sharding.Layout:
        """How ``p`` is stepped: plain, or as a DTensor's local rows or whole (optgen.runtime.sharding)."""
        layouts = self.__dict__.setdefault("_layouts", {})  # eager states are made before _init_transient
        lay = layouts.get(id(p))
        if lay is None:
            lay = sharding.PLAIN
            if sharding.is_dtensor(p):
                # per-slice statistics (Prodigy) step on local rows except in the triton kernels
                whole = self.backend == "reference" or (self._program.slice_stride is not None
                                                        and self.backend == "triton") or self._block_coded(p, group)
                position = next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)
                lay = sharding.layout_of(p, position, view_shape(self._program, p, group, {}), whole)
            layouts[id(p)] = lay
        return lay

    def _block_coded(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether a state of ``p`` is stored by a block-scaled codec (8-bit, 4-bit, FP8, int8_sr).
        Its blocks run over the whole flattened tensor (and whether it is coded at all follows the
        whole tensor's size), so a sharded parameter steps gathered: local rows would put other
        elements in a block and another scale on each (exact at the cost of the state's 1/N saving)."""
        ctx = HostContext(group, p, {}, tensor_math=False)
        # a read-only coded state (centered decay's blockwise anchor) is encoded over the whole tensor
        read_only = {name for d in self._program.state for _, name in d.codec_rules}
        if any(state_codec(d, ctx) is not None for d in self._program.state
               if d.codec_rules and (d.cond is None or evaluate(d.cond, ctx))):
            return True
        chosen = group.get("state_precision")
        for name in codecs_of(self._program):
            codec = codec_for(name)
            if name in read_only or codec.block is None or (chosen is not None and name != chosen):
                continue
            applies = codec.applies()
            if applies is None or evaluate(applies, ctx):
                return True
        return False

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        prog = self._program
        state = self.state.get(p, {})  # entered only when it holds something (torch.optim.SGD's)
        if prog.step_store == "tensor":
            state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
        ctx = HostContext(group, p, state, tensor_math=False)
        view = view_shape(prog, p, group, state)
        stride = group[prog.slice_stride] if prog.slice_stride else None
        target = elements = sliced = p
        if sharding.is_dtensor(p):  # states of the local rows, or of the whole (gathered) parameter
            lay = self._layout(p, group)
            target = elements = sliced = sharding.allocation_target(p, lay)
            view = sharding.stepped_view(lay, target, view)
            sliced = sharding.slice_source(lay, target, stride)  # the local part of the global slice
        elif self.__dict__.get("_zero") is not None:  # ZeRO: per-element states are flat shards
            self._zero.check(self._position(p), p)
            elements = state[sharding.MASTER] = self._zero.init_master(p, p.dtype)
        for decl in prog.state:
            if decl.init in ("absent", "coded"):  # "coded": written with the state whose codec stores it
                continue
            if decl.cond is not None and not evaluate(decl.cond, ctx):
                continue
            on = elements if decl.kind in (Kind.ELEMENT, Kind.BLOCK) else sliced if decl.kind == Kind.SLICE else target
            coded = new_coded_state(decl, on, ctx) if decl.codec_rules else None
            if coded is not None:
                state.update(coded)
                continue
            state[decl.name] = new_state(decl, on, group, view, ctx, decl.block or stride)
        if state:
            self.state[p] = state

    # -- checkpoints and copies ----------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """What pickle and ``copy.deepcopy`` keep: torch's ``defaults``, ``state`` and
        ``param_groups`` plus the backend and the optimizer-wide settings. Hooks are dropped (as
        torch.optim drops them); the triton runner and the caches are rebuilt by the copy."""
        drop = set(self._TRANSIENT)
        return {k: v for k, v in self.__dict__.items() if k not in drop and not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, and the end of :meth:`load_state_dict` (``state`` and ``param_groups`` only).

        Groups saved before a hyperparameter existed get the spec's default (torch.optim's
        ``setdefault``s), values the spec fixes (``constructor: false`` with a default) win over the
        saved ones, globals missing from a group start from its hyperparameters.
        """
        triton = self.__dict__.get("_triton")
        super().__setstate__(state)
        prog = self._program
        if "backend" not in self.__dict__:  # a pickle of torch.optim's three entries only
            self.backend = _auto_backend(self.param_groups, self.__dict__.get("_zero") is None)
        for name, h in prog.hypers:
            if not h.per_group and name not in self.__dict__:
                setattr(self, name, _default_value(h))
        for group in self.param_groups:
            self._complete_group(group)
        self._init_transient()
        if triton is not None:  # a load: the runner's kernels stay valid, its tables do not
            triton.invalidate()
            self._triton = triton

    def _complete_group(self, group: dict[str, Any]) -> None:
        """Fill a loaded group's missing hyperparameters and globals; fixed values win."""
        for name, h in self._program.hypers:
            if not h.per_group:
                continue
            # None marks a key users set per group (adv_optm's ``optim_type``), not a fixed value
            if not h.constructor and h.default is not None:
                group[name] = _default_value(h)
            elif name not in group:
                group[name] = _default_value(h)
        self._init_globals(group)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, in the published class's layout where the spec declares one
        (``matches.state_dict``), so that class loads it."""
        sd = super().state_dict()
        if any(sharding.is_dtensor(p) for g in self.param_groups for p in g["params"]):
            sd = self._sharded_state_dict(sd)
        if self._program.published is None:
            return sd
        return published_layout.to_published(self, sd)

    def _sharded_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        """States of local rows as DTensors sharded like their parameters, so that
        torch.distributed.checkpoint saves and reshards them (other states stay as they are)."""
        decls = {d.name: d for d in self._program.state}
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        state = dict(sd["state"])
        for i, st in state.items():
            if not isinstance(i, int) or i >= len(params):
                continue
            p, group = params[i]
            if self._layout(p, group).mode != "sharded":
                continue
            ndim = self._stepped_ndim(p, group, st)
            stride = group[self._program.slice_stride] if self._program.slice_stride else None
            state[i] = {k: sharding.to_dtensor(v, p)
                        if k in decls and isinstance(v, torch.Tensor) and not sharding.is_dtensor(v)
                        and sharding.state_sharded(decls[k].kind, ndim, decls[k].dtype == "bits")
                        else sharding.whole_slice(v, self._layout(p, group), stride)
                        if k in decls and decls[k].kind == Kind.SLICE else v
                        for k, v in st.items()}
        return {**sd, "state": state}

    def _stepped_ndim(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> int:
        view = view_shape(self._program, p, group, state)
        return len(view) if view is not None else p.dim()

    @torch._disable_dynamo  # as torch.optim.Optimizer.load_state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class, of the torch.optim / published class it reproduces, or
        of an older version of either (missing group keys take the spec's defaults, a ``step``
        saved as a number is converted).

        The order is torch.optim's: load-state-dict pre hooks (a returned dict replaces the loaded
        one), validation, the new state and groups, post hooks. Unlike torch, every saved state of a
        declared buffer is checked against its parameter's shape (a ValueError names the parameter
        and the key), and buffers with a declared dtype keep it (torch casts every non-``step``
        tensor to the parameter's dtype: a float64 host scalar of a float32 parameter would lose its
        precision).
        """
        state_dict = state_dict.copy()  # shallow, as torch: a pre hook may edit it
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if self._program.published is not None:  # the published class's layout, or this class's own
            state_dict = published_layout.from_published(self, state_dict)
        groups = self.param_groups
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in groups for p in g["params"]]
        id_map = dict(zip(saved_ids, range(len(params))))
        new_groups = []
        for g, s in zip(groups, saved_groups):
            s["params"] = g["params"]
            if "param_names" in g and "param_names" not in s:
                s["param_names"] = g["param_names"]
            self._complete_group(s)
            new_groups.append(s)
        group_of = [g for g in new_groups for _ in g["params"]]
        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for k, v in state_dict["state"].items():
            if k in id_map:
                i = id_map[k]
                state[params[i]] = self._loaded_state(i, params[i], v, group_of[i])
            else:  # kept as it is, as torch does
                state[k] = v
        self.__setstate__({"state": state, "param_groups": new_groups})
        if self._zero is not None:  # as adams-torch's __setstate__: every rank's master shards into the parameters
            for p in params:
                if sharding.MASTER in self.state.get(p, {}):
                    self._zero.write(p, self.state[p][sharding.MASTER])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded_state(self, index: int, p: torch.Tensor, saved: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        """One parameter's saved state, checked against ``p`` and cast to what the runtime steps."""
        prog = self._program
        decls = {d.name: d for d in prog.state}
        if "step" in saved and "step" not in decls and prog.step_store == "tensor":
            # older torch and adv_optm save a number; torch's fused/capturable a device float32
            saved = {**saved, "step": torch.as_tensor(saved["step"]).to(dtype=torch.get_default_dtype(), device="cpu")}
        view = view_shape(prog, p, group, saved)
        stride = group[prog.slice_stride] if prog.slice_stride else None
        target, rows, ndim = p, False, 0  # what states are shaped after; DTensor parameters: local rows
        lay = self._layout(p, group)
        if lay.mode == "sharded":
            rows = True
            target = sharding.local(p)
            ndim = len(view) if view is not None else p.dim()
            view = sharding.stepped_view(lay, target, view)
        out: dict[str, Any] = {}
        for key, value in saved.items():
            d = decls.get(key)
            if sharding.is_dtensor(value):  # torch.distributed.checkpoint's, resharded to this world
                value = sharding.from_dtensor(value, p, rows and d is not None
                                              and sharding.state_sharded(d.kind, ndim, d.dtype == "bits"))
            if d is not None and d.kind == Kind.SLICE:  # a shard's part of the whole slice
                value = sharding.local_slice(value, lay, stride)
            if key == "step" and d is None and prog.step_store == "tensor":
                out[key] = value
                continue
            if key == R_EMA and d is None and isinstance(value, torch.Tensor) and "kourkoutas_beta" in prog.features:
                # Kourkoutas-beta's running norm (the runtime's, undeclared) is float32 whatever the
                # parameter's dtype; each parameter gets its own, prepare() shares the first again
                out[key] = value.to(dtype=torch.float32, device=p.device, copy=True)
                continue
            if d is None or not isinstance(value, torch.Tensor):
                out[key] = _cast_like_torch(p, value, key)
                continue
            where = f"loaded state dict: state '{key}' of parameter {index} (shape {tuple(p.shape)})"
            try:
                layout = _coded_layout(decls, d, key, target, HostContext(group, p, saved, tensor_math=False))
                expected = [layout] if layout is not None else _saved_shapes(d, target, view, d.block or stride)
                if d.kind == Kind.SLICE and lay.mode == "sharded":  # its part of the whole slice
                    expected = _saved_shapes(d, sharding.slice_source(lay, target, stride), view, stride)
                if self._zero is not None and d.kind == Kind.ELEMENT:  # this rank's flat shard
                    expected = [(p.numel() // self._zero.world,)]
            except RuntimeError as exc:
                raise ValueError(f"{where} cannot exist for {type(self).__name__}: {exc}") from None
            if tuple(value.shape) not in expected:
                raise ValueError(f"{where} has shape {tuple(value.shape)}, expected "
                                 f"{' or '.join(map(str, expected))} (a {d.kind.label} state of {type(self).__name__})")
            if d.kind == Kind.HOST or d.dtype != "param" or d.dtype_when or d.dtype_rules:
                device = torch.device("cpu") if d.kind == Kind.HOST else p.device
                # a conditional dtype: the saved buffer has the one its condition chose
                dtype = value.dtype if d.dtype_when or d.dtype_rules else storage_dtype(d.dtype, p.dtype)
                out[key] = value.to(dtype=dtype, device=device, copy=True)
            else:
                out[key] = _cast_like_torch(p, value, key)
        return out

    # -- the step ------------------------------------------------------------------------------
    # Under torch.compile the step is one deliberate graph break: it runs eagerly (the generated
    # multi-tensor code or the fused kernels, exactly as without compile), so a compiled training
    # step breaks once here, traces no per-parameter host values and guards on no parameter.
    @torch.no_grad()
    @torch.compiler.disable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [(gi, group, self._params_with_grad(group)) for gi, group in enumerate(self.param_groups)]
        # the clip_grad feature's first phase: a reduction over every group's gradients, consumed
        # by this step (the executors step scaled copies; .grad is restored)
        with clipping.clipped_gradients(self, [p for _, _, ps in stepped for p in ps]):
            # the program's optimizer-wide reductions (reductions:): the step's first phase, read by
            # every parameter's update below (optgen.runtime.reductions; no host sync)
            self._reduced = reductions.compute(self, stepped)
            if self._kourkoutas is not None:
                first = next((ps[0] for _, _, ps in stepped if ps), None)
                if first is not None:
                    self._kourkoutas.maybe_prepare(self._completed_steps(first))
            for gi, group, params in stepped:
                self._step_params(gi, group, params)
            if self._program.post:  # after every parameter's update (feature adamw_prune's masks)
                reductions.post_update(self, stepped)
        self.finish_step()
        return loss

    def _completed_steps(self, p: torch.Tensor) -> int:
        step = self.state[p].get("step", 0)
        return int(step.item() if isinstance(step, torch.Tensor) else step)

    def _inputs(self, p: torch.Tensor) -> dict[str, Any]:
        return {} if self._kourkoutas is None else self._kourkoutas.inputs(p)

    def _step_params(self, gi: int, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if not params:
            return
        group = self._stepping_group(gi, group)
        sharded = self._zero is not None or any(map(sharding.is_dtensor, params))
        key = (self.backend, sharded)
        executor = self._executors.get(key)
        if executor is None:  # (optgen.runtime.executors: the backends behind one interface)
            executor = self._executors[key] = executor_for(self, self.backend, sharded)
        executor.step(gi, group, params)
        self._drop_empty_states(params)

    def _drop_empty_states(self, params: list[torch.Tensor]) -> None:
        """No ``self.state`` entry for a parameter the step gave no state (torch.optim.SGD without
        momentum); the backends' ``self.state[p]`` lookups create them."""
        if self._prune_empty:
            for p in params:
                if not self.state.get(p, True):
                    del self.state[p]

    # -- fused backward pass -------------------------------------------------------------------
    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor, group: dict[str, Any] | None = None, i: int | None = None) -> None:
        """Step the one parameter ``p`` (adv_optm's per-tensor entry; ``group``/``i`` are optional).

        The same update as :meth:`step` gives ``p`` when every parameter of its group is stepped,
        for optimizers whose update reads only ``p``'s own gradient and state (all of optgen's).
        """
        if p.grad is None:
            return
        reductions.refuse_partial(self)
        if clipping.active(self):
            raise RuntimeError(f"{type(self).__name__}: gradient clipping (max_grad_norm, clip_grad_value) reduces over "
                               "every parameter's gradient before the step: call step(), not step_parameter() or "
                               "attach_fused_backward()")
        gi = self._group_index(p) if group is None else next(k for k, g in enumerate(self.param_groups) if g is group)
        group = self.param_groups[gi]
        params = self._params_with_grad(group, [p])
        if self._kourkoutas is not None:
            self._kourkoutas.maybe_prepare(self._completed_steps(p))
        self._step_params(gi, group, params)

    def _group_index(self, p: torch.Tensor) -> int:
        for gi, g in enumerate(self.param_groups):
            if any(q is p for q in g["params"]):
                return gi
        raise ValueError("the parameter is not in any param group of this optimizer")

    def attach_fused_backward(self, params: Iterable[torch.Tensor] | None = None) -> FusedBackward:
        """Step each parameter as soon as its gradient is accumulated, then free the gradient.

        Registers ``register_post_accumulate_grad_hook`` on ``params`` (default: every parameter of
        the optimizer). During ``loss.backward()`` each parameter is stepped by
        :meth:`step_parameter` and its ``.grad`` set to None, so gradients of layers already
        stepped do not stay alive until the end of the backward pass: peak memory drops by up to
        the size of all gradients. Do not call :meth:`step` or accumulate gradients over several
        backward passes while attached. Returns a handle whose ``remove()`` detaches the hooks.
        """
        params = [p for g in self.param_groups for p in g["params"]] if params is None else list(params)
        return FusedBackward(self, params)

    def _triton_runner(self):
        if self._triton is None:
            from optgen.runtime.triton_runner import TritonRunner, check_available

            check_available(self.param_groups[0]["params"][0].device)
            self._triton = TritonRunner(self._program, self._triton_module)
        return self._triton

    def _params_with_grad(self, group: dict[str, Any], params: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        out = []
        for p in group["params"] if params is None else params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
            if not self.state.get(p):
                self._init_state(p, group)
            out.append(p)
        return out

    # -- torch.distributed helpers (single process: no-ops) ------------------------------------
    @torch.no_grad()
    def broadcast_buffers(self, buffers: Iterable[torch.Tensor]) -> None:
        """Broadcast module buffers from rank 0 (as ``adams.Adams_ZeRO.broadcast_buffers``)."""
        import torch.distributed as dist

        group = getattr(self, "process_group", None)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            for b in buffers:
                dist.broadcast(b, src=0, group=group)


class FusedBackward:
    """The hooks of :meth:`GeneratedOptimizer.attach_fused_backward`; ``remove()`` detaches them."""

    def __init__(self, optimizer: GeneratedOptimizer, params: list[torch.Tensor]) -> None:
        self.optimizer = optimizer
        # each hook looks its group up once here, not by scanning every group at every backward
        self.group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params if p.requires_grad]
        self._finish_queued = False

    def _hook(self, p: torch.Tensor) -> None:
        opt = self.optimizer
        if opt._program.finalize and not self._finish_queued:
            # the step ends with the backward pass: finalize (Prodigy's d) runs once, after every hook
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._finish_queued = True
        opt.step_parameter(p, self.group.get(id(p)))
        p.grad = None

    def _finish(self) -> None:
        self._finish_queued = False
        self.optimizer.finish_step()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> FusedBackward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _refuse_without_kernels(name: str, module: str) -> None:
    """``backend="triton"`` for a spec the triton backend cannot run at all: refused here, at
    construction (the generated module says why), not at the first step."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return  # no triton: the first step says so (check_available)
    if getattr(mod, "PLAN", True) is None:
        raise ValueError(f"{name} has no triton kernels: {mod.UNSUPPORTED}")


def _auto_backend(groups: list[dict[str, Any]], local: bool = True) -> str:
    """``backend="auto"``: triton on CUDA; on CPU the compiled backend when inductor has a C++
    compiler (else one warning, then torch), unless ``OPTGEN_AUTO_COMPILE=0`` (the test suite's
    setting) or the parameters are sharded (DTensor, a ZeRO group: ``local`` False); torch otherwise."""
    if _auto_triton(groups):
        return "triton"
    params = [p for g in groups for p in g["params"]]
    if (not local or not params or os.environ.get("OPTGEN_AUTO_COMPILE", "1") == "0"
            or any(p.device.type != "cpu" or sharding.is_dtensor(p) for p in params)):
        return "torch"
    from optgen.runtime.compiled import cxx_available, warn_no_cxx

    if cxx_available():
        return "compiled"
    warn_no_cxx()
    return "torch"


def _auto_triton(groups: list[dict[str, Any]]) -> bool:
    """``backend="auto"``: triton when the parameters are on CUDA and triton imports."""
    params = [p for g in groups for p in g["params"]]
    if not params or params[0].device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _flat_group(opt: Any) -> sharding.FlatGroup | None:
    """The ZeRO layout of an optimizer with a ``process_group`` (the default group when None, as
    adams-torch reads it), or None when that group has one rank (or torch.distributed is not
    initialised): then the parameters are stepped in place."""
    import torch.distributed as dist

    group = getattr(opt, "process_group", None)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        return sharding.FlatGroup(group, type(opt).__name__)
    return None


def _require_param_dtype(name: str, dtype: Any, params: list[torch.Tensor]) -> None:
    for i, p in enumerate(params):
        if dtype is not None and p.dtype != dtype:
            raise ValueError(
                f"{name}={dtype} differs from the dtype of parameter {i} ({p.dtype}): a master copy in another "
                f"dtype is not implemented; pass {name}={p.dtype} or parameters of {dtype}"
            )


def _default_value(h: Any) -> Any:
    """A hyperparameter's spec default as a group holds it (a fresh copy; ``as`` lists as tuples)."""
    value = copy.deepcopy(h.default)
    return tuple(value) if h.as_ is not None and isinstance(value, list) else value


def _coded_layout(decls: dict[str, StateDecl], d: StateDecl, key: str, p: torch.Tensor,
                  ctx: HostContext) -> tuple[int, ...] | None:
    """The shape of ``key`` where a read-only coded state's codec stores it for ``p`` (``d`` the
    state or one of the tensors its codec stores), else None (a plain state)."""
    owners = [o for o in decls.values() if o.codec_rules] if d.init == "coded" else [d] if d.codec_rules else []
    for owner in owners:
        codec = state_codec(owner, ctx)
        if codec is not None and key in stored_names(owner.name, codec, False).values():
            return coded_shapes(owner, codec, key, p)
    if d.init == "coded":
        raise RuntimeError(f"no codec of {' or '.join(o.name for o in owners)} stores it with these hyperparameters")
    return None


def _saved_shapes(d: StateDecl, p: torch.Tensor, view: tuple[int, int] | None, stride: int | None) -> list[tuple[int, ...]]:
    """The shapes a saved state ``d`` of ``p`` may have (``view``: the matrix view ``p`` steps as)."""
    if d.dtype == "bits":
        shape = packed_shape(view or tuple(p.shape))
    elif d.kind == Kind.ELEMENT:
        shape = tuple(p.shape)  # stored in the parameter's shape, stepped as its view
    else:
        shape = state_shape(d.kind, p, d.name, decl_view(d.view, p, view), stride)  # RuntimeError: no such state for p
    if any(t == PACKED_UINT4 for _, t in d.dtype_rules):  # 4-bit codes packed two per byte
        return [shape, (-(-p.numel() // 2),)]
    return [shape, ()] if d.scalar_if_zero and shape != () else [shape]


def _cast_like_torch(p: torch.Tensor, value: Any, key: Any) -> Any:
    """torch.optim's cast of a loaded value: floating tensors to the parameter's dtype and device
    (``step`` keeps its own), containers element by element, anything else as it is."""
    if isinstance(value, torch.Tensor):
        if key == "step":
            return value
        return value.to(dtype=p.dtype, device=p.device) if p.is_floating_point() else value.to(device=p.device)
    if isinstance(value, dict):
        return {k: _cast_like_torch(p, v, k) for k, v in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return type(value)(_cast_like_torch(p, v, None) for v in value)  # type: ignore[call-arg]
    return value


def _to_scalar(v: Any) -> Any:
    """torch.optim's ``_to_scalar``: a 1-element tensor as a 0-d tensor, anything else as it is."""
    return v.squeeze() if isinstance(v, torch.Tensor) and v.dim() != 0 and v.numel() == 1 else v
