"""Unit tests of lowering, canonicalisation and the scheduler."""

from __future__ import annotations

from pathlib import Path

from optgen.ir.hoist import hoist
from optgen.ir.lower import lower
from optgen.ir.nodes import Assign, If, Kind, walk_stmts
from optgen.ir.schedule import schedule, specialize
from optgen.spec.loader import load_spec

SPECS = Path(__file__).resolve().parent.parent / "specs"


def program(name: str):
    return hoist(lower(load_spec(SPECS / f"{name}.yaml")))


def assigns(prog, target: str) -> list[Assign]:
    return [s for s in walk_stmts(prog.body) if isinstance(s, Assign) and s.target == target]


def test_canonical_torch_ops() -> None:
    p = program("adamw")
    (v,) = assigns(p, "exp_avg_sq")
    assert v.value.op == "addcmul" and v.value.args[0].op == "mul"  # mul_ then addcmul_
    (m,) = assigns(p, "exp_avg")
    assert m.value.op == "lerp"
    (upd,) = [s for s in assigns(p, "param") if s.value.op == "addcdiv"]
    assert upd.value.args[3].op == "var" and upd.value.args[3].kind == Kind.HOST


def test_host_scalars_are_hoisted() -> None:
    p = program("adamw")
    for s in walk_stmts(p.body):
        if isinstance(s, Assign) and not s.value.is_host:
            stack = [s.value]
            while stack:
                n = stack.pop()
                assert not n.is_host or n.op in ("var", "const"), n
                stack.extend(n.args)
        if isinstance(s, If):
            assert s.cond.op == "var"


def test_adams_has_three_phases_for_matrices_and_one_otherwise() -> None:
    p = program("adams")
    spectral = schedule(specialize(p.body, lambda c: True))
    assert len(spectral) == 3
    assert spectral[0].produces == ["v"] or "v" in spectral[0].produces or spectral[0].statements[0].target == "v"
    assert [s.target for s in spectral[-1].statements][-1] == "param"
    plain = schedule(specialize(p.body, lambda c: False))
    assert len(plain) == 1


def test_elementwise_optimizers_are_one_phase() -> None:
    for name in ("adamw", "sgd", "rmsprop", "nadam", "radam", "adagrad"):
        p = program(name)
        assert len(schedule(specialize(p.body, lambda c: True))) == 1, name


def test_extends_merges_entries() -> None:
    p = lower(load_spec(SPECS / "adamw.yaml"))
    hypers = dict(p.hypers)
    assert hypers["weight_decay"].default == 1e-2
    assert hypers["weight_decay"].min == 0  # inherited field kept
    assert hypers["decoupled_weight_decay"].constructor is False
    assert p.matches.class_ == "torch.optim.AdamW"


def test_every_device_function_has_a_torch_and_a_reference_implementation() -> None:
    """A function a spec may apply to tensors runs on both CPU backends (strided is the reference
    interpreter's own case: it reads the stride from its second argument)."""
    from optgen.backends import reference
    from optgen.ir.library import FUNCTIONS
    from optgen.runtime import foreach

    device_functions = [name for name, f in FUNCTIONS.items() if f.tensor]
    assert [n for n in device_functions if not callable(getattr(foreach, n, None))] == []
    assert [n for n in device_functions if n not in reference._OPS and n != "strided"] == []
