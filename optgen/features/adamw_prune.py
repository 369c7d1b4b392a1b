"""``adamw_prune``: AdamWPrune's state-based pruning (github.com/mcgrof/AdamWPrune, seed-era
``lib/optimizers.py``; math/torch-adams-adamw-family.md §3.6), on any Adam-family spec.

A prunable parameter (``param.prunable = True``; :func:`optgen.runtime.param_groups.mark_prunable`
marks the ``.weight`` of every ``nn.Linear`` and ``nn.Conv2d``, AdamWPrune's choice) keeps a bool
state ``adamprune_mask`` (all true at first). With ``adamwprune_enable_pruning``:

* before the update its gradient is multiplied by the mask (``apply_adamprune_masking``);
* after every parameter's update (the program's post-update phase, ``Program.post``), with the
  pruning step counter ``sc`` (``adamprune_step_count + 1``, a global advanced by ``finalize``):
  when ``sc > warmup`` and ``sc % frequency == 0``, the sparsity ramps linearly,
  ``s = target * min(1, (sc - warmup) / (ramp_end - warmup))``; the importance of each element,
  ``|w m| * (|w| / (sqrt(v) + 1e-8))`` (bitter0, from the stepped moments), gives one global
  threshold over every prunable element, the ``floor(s * count)``-th smallest (a ``kthvalue``
  reduction of the post phase); the mask becomes ``importance > threshold`` and the weights are
  multiplied by it; later steps past the warm-up multiply the weights by it again;
* every step (warm-up included) the first and second moments are multiplied by the mask
  (``max_exp_avg_sq`` is not, as published).

Masks are states: they are in the state dict. The schedule's hyperparameters are read from
param group 0 (``first_group``), as AdamWPrune keeps one ``adamprune_state``. Roles:
``first_moment`` and ``second_moment`` (the dialect's ``exp_avg`` / ``exp_avg_sq``).

Not reproduced: AdamWPrune's HEAD variants (bitter1-9, the cubic ramp, the 2% random sample of the
scores), the epoch loops' ``ramp_end_step = len(train_loader) * ramp_end_epoch`` (pass the product),
and a base whose first-phase reductions read the gradient (AdamWSPAM): the mask would have to
reach those reductions too, which the feature refuses to guess.
"""

from __future__ import annotations

from optgen.errors import Position
from optgen.features import Feature
from optgen.features.rewrite import FeatureError, names_in, role_target
from optgen.ir.nodes import GlobalDecl, Kind, Node, Program, ReductionDecl, StateDecl, walk_nodes
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

FLAG = "adamwprune_enable_pruning"
MASK = "adamprune_mask"
COUNT = "adamprune_step_count"
THRESHOLD = "adamprune_threshold"
HERE = Position("<feature adamw_prune>", 1, 1)

#: the pruning step of this ``step()`` (AdamWPrune increments ``step_count`` first)
_PRUNING_STEP = (f"{FLAG} and {COUNT} + 1 > adamwprune_warmup_steps and "
                 f"({COUNT} + 1) % adamwprune_frequency == 0")
_SPARSITY = (f"adamwprune_target_sparsity * min(1.0, ({COUNT} + 1 - adamwprune_warmup_steps) / "
             "(adamwprune_ramp_end_step - adamwprune_warmup_steps))")


def _lowerer(program: Program):
    from optgen.ir.lower import Lowerer

    lw = Lowerer(program.source, program.hypers, program.state, program.step_store,
                 (*(g.name for g in program.globals), COUNT), tuple(a.name for a in program.accumulators),
                 program.slice_stride)
    lw.reductions = {r.name for r in program.reductions} | {THRESHOLD}
    return lw


def _expr(lw, text: str) -> Node:
    from optgen.spec.expr import parse_expression

    return lw.expr(parse_expression(text, HERE, "adamw_prune"), "adamw_prune")


def _statements(lw, items: list) -> list:
    """Lower ``items`` (``"target = expr"`` strings and ``(condition, then, else)`` triples)."""
    from optgen.spec.expr import parse_assignment, parse_expression
    from optgen.spec.loader import SAssign, SIf

    def parsed(item):
        if isinstance(item, str):
            target, e, pos, acc = parse_assignment(item, HERE, "adamw_prune")
            return SAssign(target, e, pos, "adamw_prune", acc)
        cond, then, orelse = item
        return SIf(parse_expression(cond, HERE, "adamw_prune"), [parsed(i) for i in then],
                   [parsed(i) for i in orelse], HERE, "adamw_prune")

    return lw.statements([parsed(i) for i in items])


def _apply(program: Program) -> Program:
    m = role_target(program, "first_moment", "exp_avg")
    v = role_target(program, "second_moment", "exp_avg_sq")
    for name in (m, v):
        if not any(s.name == name and s.kind == Kind.ELEMENT for s in program.state):
            raise FeatureError(f"adamw_prune needs the per-element moment state '{name}' (roles first_moment and "
                               "second_moment of an Adam-family spec)")
    taken = names_in(program) & {MASK, COUNT, THRESHOLD}
    if taken:
        raise FeatureError(f"adamw_prune: the spec already uses the name(s) {', '.join(sorted(taken))}")
    reading = [r.name for r in program.reductions
               if any(n.op == Op.VAR and n.attr == "grad" for n in walk_nodes(r.of))]
    if reading:
        raise FeatureError(f"adamw_prune: the reductions {', '.join(reading)} read the gradient before the step; "
                           "the pruning mask of the gradient would not reach them (not supported)")
    lw = _lowerer(program)
    mask = StateDecl(MASK, Kind.ELEMENT, "ones", "bool", _expr(lw, "param_attr('prunable', False)"),
                     "AdamWPrune's pruning mask (adamprune_mask): false where the weight is pruned")
    state = [*program.state, mask]
    lw = _lowerer(program.copy(state=state))
    importance = _expr(lw, _importance_text(m, v))
    lw.scalars["count"] = ("count", None, "float")
    from optgen.ir.reductions import _rename_count

    k = _rename_count(_expr(lw, f"floor({_SPARSITY} * count)"))
    del lw.scalars["count"]
    threshold = ReductionDecl(THRESHOLD, importance, "kthvalue", k=k, select=_expr(lw, f"has({MASK})"),
                              cond=_expr(lw, _PRUNING_STEP), phase="post",
                              doc="the global importance threshold of a pruning step")
    masked_grad = _statements(lw, [(f"{FLAG} and has({MASK})", [f"grad = grad * cast({MASK}, grad)"], [])])
    keep = f"param = param * cast({MASK}, param)"
    post = _statements(lw, [(f"{FLAG} and has({MASK})", [
        (_PRUNING_STEP, [f"{MASK} = {_importance_text(m, v)} > {THRESHOLD}", keep],
         [(f"{COUNT} + 1 > adamwprune_warmup_steps", [keep], [])]),
        f"{m} = {m} * cast({MASK}, {m})",
        f"{v} = {v} * cast({MASK}, {v})",
    ], [])])
    from optgen.ir.lower import FinalizeLowerer
    from optgen.spec.expr import parse_assignment
    from optgen.spec.loader import SAssign

    fin = FinalizeLowerer(program.source, program.hypers, state, program.step_store,
                          (*(g.name for g in program.globals), COUNT), tuple(a.name for a in program.accumulators))
    target, e, pos, _ = parse_assignment(f"{COUNT} = {COUNT} + where({FLAG}, 1, 0)", HERE, "adamw_prune")
    finalize = [*program.finalize, *fin.statements([SAssign(target, e, pos, "adamw_prune.finalize")])]
    return program.copy(
        state=state, body=[*masked_grad, *program.body], post=[*program.post, *post],
        reductions=[*program.reductions, threshold], finalize=finalize,
        globals=[*program.globals, GlobalDecl(COUNT, Node("const", attr=0), "AdamWPrune's adamprune_state['step_count']")],
    )


def _importance_text(m: str, v: str) -> str:
    """bitter0's importance, in AdamWPrune's order: |w * m| times |w| / (sqrt(v) + 1e-8)."""
    return f"abs(param * {m}) * (abs(param) / (sqrt({v}) + 1.0e-8))"


def _first(h: HyperparameterSpec) -> HyperparameterSpec:
    return h.model_copy(update={"first_group": True})


FEATURE = Feature(
    name="adamw_prune",
    doc="AdamWPrune: masks from the Adam moments, a global kthvalue threshold after the step, the sparsity ramp.",
    transform=_apply,
    hyperparameters={
        FLAG: _first(HyperparameterSpec(default=False, type="bool", doc="prune (AdamWPrune's state-based pruning)")),
        "adamwprune_target_sparsity": _first(HyperparameterSpec(default=0.7, min=0, max=1,
                                                                doc="final fraction of pruned prunable weights")),
        "adamwprune_warmup_steps": _first(HyperparameterSpec(default=100, type="int", min=0,
                                                             doc="steps before the first pruning")),
        "adamwprune_frequency": _first(HyperparameterSpec(default=50, type="int", min_exclusive=0,
                                                          doc="steps between mask recomputations")),
        "adamwprune_ramp_end_step": _first(HyperparameterSpec(default=3000, type="int", min=1,
                                                              doc="step at which the sparsity reaches its target")),
    },
)
