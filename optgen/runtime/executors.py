"""The step's backends behind one interface: an executor steps one param group's parameters.

:class:`optgen.runtime.base.GeneratedOptimizer` keeps torch.optim's contract (param groups, state
allocation, checkpoints and copies, optimizer-wide values); an executor turns the parameters of
one group that have gradients into updated parameters and states, and hands each parameter's
contributions to the program's accumulators back to the optimizer. Three executors:

- :class:`ReferenceExecutor`: the IR interpreter, one parameter at a time (the oracle);
- :class:`TorchExecutor`: the generated multi-tensor step per bucket of parameters that take the
  same branches (``compiled=True``: each bucket compiled by inductor into one fused loop);
- :class:`TritonExecutor`: the generated fused kernels, through the triton runner.

Sharded parameters are a layer the executors ask for the tensors they step
(:func:`optgen.runtime.sharding.bucket_tensors`, :func:`optgen.runtime.sharding.whole_tensors`):
a DTensor's local rows or its gathered whole, a ZeRO master shard; nothing here branches on it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer  # a GeneratedOptimizer: base.py imports this module, not the reverse

from optgen.backends import reference
from optgen.ir.codecs import codec_for
from optgen.ir.nodes import Assign, If, Kind, Node, Program, Stmt, walk_nodes, walk_stmts
from optgen.ir.ops import Op
from optgen.numerics import stochastic
from optgen.numerics.host import HostContext, evaluate, meta_value, to_device_scalar
from optgen.numerics.matrix_view import ViewedState, as_view, view_shape
from optgen.runtime import sharding

#: On CPU a bucket is stepped in chunks of at most this many elements: one op at a time over every
#: tensor streams them all through memory, while a chunk's buffers stay in cache between its ops.
CPU_CHUNK_ELEMENTS = 1 << 18


class Executor:
    """Steps the parameters of one group (all with gradients and states) of ``opt``."""

    def __init__(self, opt: Optimizer) -> None:
        self.opt = opt
        self.program: Program = opt._program

    def step(self, gi: int, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        opt = self.opt
        if self.program.step_store == "tensor":
            torch._foreach_add_([opt.state[p]["step"] for p in params], 1)
        parts: dict[int, list[tuple[str, Any]]] = {}
        self.run(group, params, parts)
        if self.program.accumulators:
            opt._accumulate(params, parts)

    def run(self, group: dict[str, Any], params: list[torch.Tensor], parts: dict[int, list[tuple[str, Any]]]) -> None:
        raise NotImplementedError  # pragma: no cover


class ReferenceExecutor(Executor):
    def run(self, group: dict[str, Any], params: list[torch.Tensor], parts: dict[int, list[tuple[str, Any]]]) -> None:
        opt = self.opt
        for p in params:
            parts[id(p)] = []
            param, grad, done = sharding.whole_tensors(opt, group, p)
            reference.run(self.program, param, grad, opt.state[p], group, opt._inputs(p), parts[id(p)],
                          opt.__dict__.get("_reduced"))
            done()


class TritonExecutor(Executor):
    def step(self, gi: int, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        opt = self.opt
        sums = _triton_step(opt._triton_runner(), gi, group, params, opt.state, opt._inputs,
                            opt.__dict__.get("_reduced"))
        opt._accumulate_vector(params, sums)


class ShardedTritonExecutor(Executor):
    """The fused kernels over DTensor parameters: each steps as a stand-in, its local rows (a
    detached alias of the local tensor, given the local gradient) or its gathered whole, through
    :class:`optgen.runtime.sharded_triton.ShardedTritonRunner` (collectives between the stages)."""

    def __init__(self, opt: Optimizer) -> None:
        super().__init__(opt)
        self.stand_ins: dict[int, torch.Tensor] = {}  # by id(parameter): stable, so the tables are cached

    def runner(self) -> Any:
        from optgen.runtime.sharded_triton import ShardedTritonRunner
        from optgen.runtime.triton_runner import check_available

        opt = self.opt
        if not isinstance(opt._triton, ShardedTritonRunner):  # it also steps plain tensors as the plain runner
            check_available(opt.param_groups[0]["params"][0].device)
            opt._triton = ShardedTritonRunner(self.program, opt._triton_module)
        return opt._triton

    def stand_in(self, p: torch.Tensor, lay: sharding.Layout) -> torch.Tensor:
        if not sharding.is_dtensor(p):
            return p
        t = self.stand_ins.get(id(p))
        if lay.mode == "gathered":
            full = sharding.gather_full(sharding.local(p), lay.shard)
            if t is None or t.shape != full.shape:
                t = full
            else:
                t.copy_(full)
            t.grad = sharding.gather_full(sharding.local(p.grad), lay.shard)
        else:
            lt = sharding.local(p)
            if t is None or t.data_ptr() != lt.data_ptr() or t.shape != lt.shape:
                t = lt.detach()  # shares the local rows' memory: the kernels write the parameter
            t.grad = sharding.local(p.grad)
        self.stand_ins[id(p)] = t
        return t

    def step(self, gi: int, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        opt = self.opt
        runner = self.runner()
        lays = [opt._layout(p, group) for p in params]
        stand = [self.stand_in(p, lay) for p, lay in zip(params, lays)]
        runner.bound = {id(t): (p, lay) for t, p, lay in zip(stand, params, lays) if t is not p}
        of = {id(t): p for t, p in zip(stand, params)}
        states = {t: opt.state[p] for t, p in zip(stand, params)}
        try:
            sums = _triton_step(runner, gi, group, stand, states, lambda t: opt._inputs(of[id(t)]))
        finally:
            for t, p, lay in zip(stand, params, lays):
                if t is not p:
                    sharding.keep_rows(p, lay, t)
                    t.grad = None
        opt._accumulate_vector(params, sums)


class TorchExecutor(Executor):
    """The generated ``_device_step`` over buckets of parameters that take the same branches."""

    def __init__(self, opt: Optimizer, compiled: bool = False) -> None:
        super().__init__(opt)
        prog = self.program
        self.compiled_backend = compiled
        self.device_step = type(opt)._device_step
        self.device_state = [d.name for d in prog.state if d.kind != Kind.HOST]
        self.rounds: dict[Any, bool] = {}  # branch path -> whether it stochastically rounds (or draws)
        #: what the host pass reads per parameter (its results are shared by parameters that agree)
        self.host_reads = _host_reads(prog)
        #: the step draws Gaussian sketches (low-rank orthogonalisation) from the rounding's stream
        self.sketches = any(n.op.startswith("low_rank_") for s in walk_stmts(prog.body) if isinstance(s, Assign)
                            for n in walk_nodes(s.value))
        #: the step draws uniform noise (stream_rand: the stochastic sign) from the rounding's stream
        self.streams = any(n.op == "stream_rand" for s in walk_stmts(prog.body) if isinstance(s, Assign)
                           for n in walk_nodes(s.value))
        self.compiled = None  # optgen.runtime.compiled's entry, on the first compiled bucket

    def buckets(self, group: dict[str, Any], params: list[torch.Tensor]) -> dict[tuple, list[tuple]]:
        """Parameters by branch path, each with its host values and matrix view."""
        opt, prog = self.opt, self.program
        tensor_math = prog.step_math == "tensor"
        buckets: dict[tuple, list[tuple[torch.Tensor, dict[str, Any], tuple[int, int] | None]]] = {}
        reads = self.host_reads
        done: dict[tuple, tuple[tuple, dict[str, Any]]] = {}  # one host pass per distinct reads
        for p in params:
            state = opt.state[p]
            view = view_shape(prog, p, group, state)
            if reads is not None:
                key = _host_key(reads, p, state, view)
                if key in done:
                    path_, env = done[key]
                    buckets[path_].append((p, env, view))
                    continue
            ctx = HostContext(group, p, state, tensor_math, view)
            ctx.inputs = opt._inputs(p)
            path: list[tuple[str, bool]] = []
            _host_pass(prog.body, ctx, path)
            buckets.setdefault(tuple(path), []).append((p, ctx.env, view))
            if reads is not None:
                done[key] = (tuple(path), ctx.env)
        return buckets

    def run(self, group: dict[str, Any], params: list[torch.Tensor], parts: dict[int, list[tuple[str, Any]]]) -> None:
        opt, prog = self.opt, self.program
        buckets = self.buckets(group, params)
        if ((self.sketches or self.streams) and any(p.dtype == torch.bfloat16 for p in params)) or (
                self.streams and len(buckets) > 1) or self.draws_twice(buckets):
            # low-rank sketches, uniform noise and stochastic rounding share adv_optm's random stream,
            # drawn per parameter (its sketch or noise, then its rounding): step the parameters one at
            # a time, in order (buckets would draw the noise out of parameter order)
            where = {id(item[0]): (path, item) for path, items in buckets.items() for item in items}
            ahead: dict[int, torch.Tensor] = {}
            chunks = [(where[id(p)][0], [where[id(p)][1]]) for p in params]
        else:
            ahead = self.random_bits_ahead(buckets, params)
            # compiled: one graph per bucket already makes one pass; cache chunks would only add graphs
            chunks = [(path, chunk) for path, items in buckets.items()
                      for chunk in ([items] if self.compiled_backend else _cache_chunks(items))]
        for path, items in chunks:
            h = _host_values(path, items)
            stepped, layout, finish = sharding.bucket_tensors(opt, group, items)
            # factored parameters are stepped as matrix views, their 1-bit states unpacked
            viewed = [ViewedState(prog, opt.state[p], view, t) for (p, _, _), (t, _, view) in zip(items, stepped)]
            ps = [as_view(t, view, "parameter") for t, _, view in stepped]
            grads = [as_view(g, view, "gradient") for _, g, view in stepped]
            states = {n: [v.view.get(n) for v in viewed] for n in self.device_state}
            if prog.reductions:  # the step's optimizer-wide values: one (shared) 0-d tensor per tensor
                if layout is not None:
                    raise sharding.refuse_reductions(prog.class_name)
                for name, value in opt.__dict__.get("_reduced", {}).items():
                    states[name] = [value] * len(ps)
            acc: list[tuple[str, list]] = []
            with stochastic.drawn([ahead[id(p)] for p, _, _ in items if id(p) in ahead]), sharding.bucket(layout):
                if layout is None and self.compiled_backend and self.step_compiled(path, h, ps, grads, states, acc):
                    pass
                elif prog.accumulators:
                    self.device_step(h, ps, grads, states, acc)
                else:
                    self.device_step(h, ps, grads, states)
            for name, values in acc:
                for (p, _, _), value in zip(items, values if isinstance(values, list) else [values] * len(items)):
                    parts.setdefault(id(p), []).append((name, value))
            for n in self.device_state:
                for v, t in zip(viewed, states[n]):
                    if t is not None and v.view.get(n) is None:
                        v.view[n] = t
            for v in viewed:
                v.write_back()
            finish()

    def step_compiled(self, path: tuple, h: dict[str, Any], ps: list, grads: list, states: dict[str, list],
                      acc: list) -> bool:
        """The compiled backend's bucket step; False: step it eagerly (stochastic rounding and
        low-rank sketches draw from a random stream eagerly, or it failed to compile)."""
        if self.path_draws(path):
            return False
        if self.compiled is None:
            from optgen.runtime.compiled import CompiledSteps, number_args

            self.compiled = CompiledSteps(self.device_step, bool(self.program.accumulators), number_args(self.program))
        return self.compiled.run(h, ps, grads, states, acc)

    def random_bits_ahead(self, buckets: dict[tuple, list], params: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Stochastic-rounding bits drawn in parameter order (adv_optm's stream), when more than one
        bucket rounds: buckets would draw them out of order."""
        if "stochastic_rounding" not in self.program.features or len(buckets) < 2:
            return {}
        paths = [items for path, items in buckets.items() if self.path_rounds(path)]
        if len(paths) < 2:
            return {}
        rounding = {id(p) for items in paths for p, _, _ in items}
        return {id(p): stochastic.draw(p) for p in params if id(p) in rounding}

    def path_rounds(self, path: tuple) -> bool:
        if path not in self.rounds:
            self.rounds[path] = _path_rounds(self.program.body, dict(path))
        return self.rounds[path]

    def draws_twice(self, buckets: dict[tuple, list]) -> bool:
        """Whether a bucket of several parameters draws from adv_optm's stream more than once per
        parameter (stochastically rounded state writes): multi-tensor ops would draw them
        tensor by tensor, adv_optm draws them parameter by parameter."""
        for path, items in buckets.items():
            if len(items) > 1 or len(buckets) > 1:
                key = ("count", path)
                if key not in self.rounds:
                    self.rounds[key] = _path_draw_count(self.program.body, dict(path)) > 1
                if self.rounds[key]:
                    return True
            if len(buckets) > 1:
                # a state's stochastic encode draws in bucket order, not parameter order (the
                # parameter's own rounding bits are drawn ahead in order: random_bits_ahead)
                key = ("codec", path)
                if key not in self.rounds:
                    self.rounds[key] = _path_codec_draws(self.program.body, dict(path))
                if self.rounds[key]:
                    return True
        return False

    def path_draws(self, path: tuple) -> bool:
        """Whether the branch path draws random numbers (stochastic rounding, low-rank sketches)."""
        key = ("draws", path)
        if key not in self.rounds:
            self.rounds[key] = _path_rounds(self.program.body, dict(path), sketches=True)
        return self.rounds[key]


def executor_for(opt: Optimizer, backend: str, sharded: bool) -> Executor:
    """The executor of ``backend``; sharded parameters step through the torch executor's code
    (collectives run between its ops), DTensors on the triton backend through its kernels on
    their local rows (collectives between the stages)."""
    if sharded and opt._zero is None and backend in ("reference", "triton"):
        return ReferenceExecutor(opt) if backend == "reference" else ShardedTritonExecutor(opt)
    if sharded:  # ZeRO's flat shards, and DTensors on the torch / compiled backends
        return TorchExecutor(opt)
    if backend == "triton":
        return TritonExecutor(opt)
    if backend == "reference":
        return ReferenceExecutor(opt)
    return TorchExecutor(opt, compiled=backend == "compiled")


@torch.compiler.disable
def _triton_step(runner: Any, gi: int, group: dict[str, Any], params: list[torch.Tensor], state: Any,
                 inputs: Any, reduced: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    # A deliberate graph break under torch.compile: the launch needs pointers of the live tensors,
    # which a traced graph cannot hold; forward and backward stay compiled around it.
    if reduced:
        return runner.step(gi, group, params, state, inputs, reduced=reduced)
    return runner.step(gi, group, params, state, inputs)


def _host_values(path: tuple, items: list[tuple]) -> dict[str, Any]:
    """A bucket's host values: one number where its parameters agree, else one per parameter."""
    h: dict[str, Any] = dict(path)
    env0 = items[0][1]
    shared = all(env is env0 for _, env, _ in items)  # one host pass served them all
    for name in env0:
        if shared:
            v = to_device_scalar(env0[name])
            h[name] = [v] * len(items) if _has_nan([v]) else v
            continue
        values = [to_device_scalar(env[name]) for _, env, _ in items]
        first = values[0]
        h[name] = first if all(v == first for v in values) and not _has_nan(values) else values
    return h


def _has_nan(values: list[Any]) -> bool:
    return any(isinstance(v, float) and math.isnan(v) for v in values)


def _cache_chunks(items: list[tuple]) -> list[list[tuple]]:
    """A bucket's parameters in chunks that fit in cache (CPU), or whole (other devices)."""
    if not items or items[0][0].device.type != "cpu":
        return [items]
    chunks: list[list[tuple]] = [[]]
    size = 0
    for item in items:
        n = item[0].numel()
        if chunks[-1] and size + n > CPU_CHUNK_ELEMENTS:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n
    return chunks


def _path_rounds(stmts: list[Stmt], taken: dict[str, bool], sketches: bool = False) -> bool:
    """Whether the branch path ``taken`` reaches a stochastic rounding (or, with ``sketches``, a
    low-rank sketch: both draw from adv_optm's random stream)."""
    for s in stmts:
        if isinstance(s, If):
            branch = s.then if taken.get(s.cond.attr, False) else s.orelse
            if _path_rounds(branch, taken, sketches):
                return True
        elif any(n.op == Op.STOCHASTIC_ROUND or _draws(n)
                 or (sketches and (n.op.startswith("low_rank_") or n.op in (Op.RAND_LIKE, Op.STREAM_RAND)))
                 for n in walk_nodes(s.value)):
            return True
    return False


def _draws(n: Node) -> bool:
    """A stochastic state codec's encode (feature state_precision) draws random bits."""
    return n.op == Op.ENCODE and codec_for(n.attr[0]).stochastic


def _path_codec_draws(stmts: list[Stmt], taken: dict[str, bool]) -> bool:
    """Whether the branch path ``taken`` writes a stochastically encoded state."""
    for s in stmts:
        if isinstance(s, If):
            if _path_codec_draws(s.then if taken.get(s.cond.attr, False) else s.orelse, taken):
                return True
        elif any(_draws(n) for n in walk_nodes(s.value)):
            return True
    return False


def _path_draw_count(stmts: list[Stmt], taken: dict[str, bool]) -> int:
    """How many draws from adv_optm's stream the branch path ``taken`` makes per parameter."""
    count = 0
    for s in stmts:
        if isinstance(s, If):
            count += _path_draw_count(s.then if taken.get(s.cond.attr, False) else s.orelse, taken)
        else:
            count += sum(1 for n in walk_nodes(s.value) if n.op in (Op.STOCHASTIC_ROUND, Op.STREAM_RAND) or _draws(n))
    return count


def _host_reads(prog: Program) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None:
    """The per-parameter facts the host pass reads besides the group and the step (``meta``
    names, ``has`` states, host states), or None when it writes host states or reads runtime
    inputs or parameter attributes: then it runs for every parameter."""
    host_states = {d.name for d in prog.state}  # a host read of any state's value
    metas: set[str] = set()
    has: set[str] = set()
    states: set[str] = set()
    for s in walk_stmts(prog.body):
        if isinstance(s, If):
            root = s.cond
        elif isinstance(s, Assign) and s.value.is_host:
            if s.role == "host_state":
                return None
            root = s.value
        else:
            continue
        for n in walk_nodes(root):
            if n.op in (Op.INPUT, Op.PARAM_ATTR):
                return None
            if n.op == Op.META:
                metas.add(n.attr)
            elif n.op == Op.HAS:
                has.add(n.attr)
            elif n.op == Op.VAR and n.attr in host_states:
                states.add(n.attr)
    return tuple(sorted(metas)), tuple(sorted(has)), tuple(sorted(states))


def _host_key(reads: tuple, p: torch.Tensor, state: dict, view: tuple[int, int] | None) -> tuple:
    """What one parameter's host pass depends on besides its group: equal keys, equal results."""
    metas, has, states = reads
    return (_scalar_key(state.get("step")), view, p.dtype, p.device, tuple(meta_value(m, p, view) for m in metas),
            tuple(state.get(n) is not None for n in has), tuple(_scalar_key(state.get(n)) for n in states))


def _scalar_key(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return (v.item(), v.dtype) if v.numel() == 1 else id(v)  # a tensor read whole: never shared
    return v


def _host_pass(stmts: list[Stmt], ctx: HostContext, path: list[tuple[str, bool]]) -> None:
    """Evaluate the host statements of one parameter and record which branches it takes."""
    for s in stmts:
        if isinstance(s, If):
            taken = bool(ctx.env[s.cond.attr]) if s.cond.op == Op.VAR else bool(evaluate(s.cond, ctx))
            path.append((s.cond.attr, taken))
            _host_pass(s.then if taken else s.orelse, ctx, path)
        elif isinstance(s, Assign) and s.value.is_host:
            if s.role == "host_state":
                ctx.self_ref = s.target
                value = evaluate(s.value, ctx)
                ctx.self_ref = None
                ctx.state[s.target].copy_(torch.as_tensor(value))
            else:
                ctx.env[s.target] = evaluate(s.value, ctx)
