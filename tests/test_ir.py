"""Unit tests of lowering, canonicalisation and the scheduler (the triton plan's stages: the one
scheduler, which `optgen show` reports)."""

from __future__ import annotations

from pathlib import Path

from optgen.backends.triton_plan import dynamic_names, enumerate_paths, plan_path
from optgen.ir.hoist import hoist
from optgen.ir.nodes import Assign, If, Kind, walk_stmts
from optgen.pipeline import lower
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


def element_passes(prog) -> list[list[str]]:
    """Per branch path of the triton plan: the kinds of its stages (``pass``, ``vec``, ``call``)."""
    dyn = dynamic_names(prog)
    return [[st.kind for st in plan_path(prog, key, stmts, dyn).stages]
            for key, stmts in enumerate_paths(prog.body, dyn)]


def test_adams_has_three_passes_for_matrices_and_one_otherwise() -> None:
    paths = element_passes(program("adams"))
    counts = sorted({k.count("pass") for k in paths})
    assert counts == [1, 3], counts  # the spectral path: W^T u, W v, then the update pass
    spectral = [k for k in paths if k.count("pass") == 3]
    assert all(k == ["pass", "vec", "pass", "vec", "pass"] for k in spectral), spectral


def test_elementwise_optimizers_are_one_pass() -> None:
    for name in ("adamw", "sgd", "rmsprop", "nadam", "radam", "adagrad"):
        for kinds in element_passes(program(name)):
            assert kinds == ["pass"], (name, kinds)


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
