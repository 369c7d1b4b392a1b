"""``atan2_adams``: Adams' bounded update as a feature (issue 15 item 2).

Adams is ``specs/adams.yaml`` = an Adam-like base whose update divides by ``denom``, plus
``atan2_adams`` (the division becomes ``atan2``: no flag, no 4/pi, no eps) plus ``spectral_decay``;
its generated module is golden-tested (tests/test_cli_and_golden.py) and its equivalence with
adams-torch is tests/test_equivalence.py. Here the feature is tried by itself on two bases with
names unlike the published specs, against eager references written here.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from optgen.errors import SpecError
from optgen.ir.nodes import Assign, walk_nodes, walk_stmts
from optgen.pipeline import lower
from optgen.render import compile_spec
from optgen.smoke import import_built
from optgen.spec.loader import load_spec
from tests.models import make_model, max_diffs, train

# an RMSprop-like base: the division sits inside the parameter write
RMS = """
name: {name}
class: Rms
hyperparameters:
  lr: {{default: 1.0e-2}}
  rho: {{default: 0.9}}
features: {features}
{roles}
state:
  acc: {{kind: element, init: zeros}}
update:
  - acc = acc * rho + (1 - rho) * grad * grad
  - scale_ = sqrt(acc)
  - param = param - lr * (grad / scale_)
"""

# an Adam-like base with its own names: the division is its own statement, twice (a look-ahead)
TWICE = """
name: {name}
class: Twice
hyperparameters:
  lr: {{default: 1.0e-2}}
  b1: {{default: 0.9}}
  b2: {{default: 0.99}}
features: {features}
{roles}
state:
  m1: {{kind: element, init: zeros}}
  m2: {{kind: element, init: zeros}}
update:
  - m1 = lerp(m1, grad, 1 - b1)
  - m2 = lerp(m2, grad * grad, 1 - b2)
  - r = sqrt(m2)
  - d1 = m1 / r
  - d2 = grad / r
  - param = param - lr * (b1 * d1 + (1 - b1) * d2)
"""


def _spec(tmp_path, template: str, features: list[str], roles: str = "", name: str = "base"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(template.format(name=name, features=features, roles=roles)))
    return path


class _RmsRef(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-2, rho=0.9):
        super().__init__(params, dict(lr=lr, rho=rho))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                acc = self.state[p].setdefault("acc", torch.zeros_like(p))
                acc.mul_(g["rho"]).add_((1 - g["rho"]) * p.grad * p.grad)
                p.sub_(g["lr"] * torch.atan2(p.grad, acc.sqrt()))


class _TwiceRef(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-2, b1=0.9, b2=0.99):
        super().__init__(params, dict(lr=lr, b1=b1, b2=b2))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            b1, b2 = g["b1"], g["b2"]
            for p in g["params"]:
                st = self.state[p]
                m1 = st.setdefault("m1", torch.zeros_like(p))
                m2 = st.setdefault("m2", torch.zeros_like(p))
                m1.lerp_(p.grad, 1 - b1)
                m2.lerp_(p.grad * p.grad, 1 - b2)
                r = m2.sqrt()
                p.sub_(g["lr"] * (b1 * torch.atan2(m1, r) + (1 - b1) * torch.atan2(p.grad, r)))


# The MLP only: the transformer's `col` parameter has gradients near 0 where atan2(g, sqrt(acc)) is
# ill-conditioned (both arguments tiny), so 1-ulp differences of the first step (foreach vs
# per-tensor ops) grow to 2e-2 by step 2 in either implementation.
@pytest.mark.parametrize("model", ["mlp"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("base", ["rms", "twice"])
def test_atan2_adams_on_two_bases_matches_an_eager_reference(tmp_path, model, backend, base) -> None:
    template, roles, ref = (RMS, "roles: {denominator: scale_}", _RmsRef) if base == "rms" else \
        (TWICE, "roles: {denominator: r}", _TwiceRef)
    built = compile_spec(_spec(tmp_path, template, ["atan2_adams"], roles, name=f"a2_{base}"))
    cls = getattr(import_built(built, built.module), built.program.class_name)
    dtype = torch.float64
    ours, losses = train(make_model(model, dtype), lambda ps: cls(ps, backend=backend), 30, dtype)
    theirs, _ = train(make_model(model, dtype), ref, 30, dtype)
    assert max_diffs(ours, theirs)[0] < 1e-12  # float64, 30 steps: the same ops in another order
    assert losses[-1] < losses[0]


def test_every_division_by_the_denominator_and_only_those_become_atan2(tmp_path) -> None:
    prog = lower(load_spec(_spec(tmp_path, TWICE.replace("(1 - b1) * d2", "(1 - b1) * d2 / lr"),
                                 ["atan2_adams"], "roles: {denominator: r}")))
    ops = [n.op for s in walk_stmts(prog.body) if isinstance(s, Assign) for n in walk_nodes(s.value)]
    assert ops.count("atan2") == 2 and ops.count("div") == 1  # d2 / lr stays a division


def test_an_undeclared_denominator_is_an_error_at_the_feature(tmp_path) -> None:
    with pytest.raises(SpecError) as exc:
        lower(load_spec(_spec(tmp_path, RMS, ["atan2_adams"])))
    assert "a division by the denominator 'denom'" in exc.value.message and "roles:" in exc.value.message
    assert exc.value.position.line == 7  # the features: entry


def test_atan2_adams_and_atan2_conflict(tmp_path) -> None:
    with pytest.raises(SpecError) as exc:
        lower(load_spec(_spec(tmp_path, RMS, ["atan2_adams", "atan2"], "roles: {denominator: scale_}")))
    assert "conflicts with" in exc.value.message


def test_adams_is_a_base_with_atan2_adams_and_spectral_decay() -> None:
    from tests.published import ROOT

    prog = lower(load_spec(ROOT / "specs" / "adams.yaml"))
    assert prog.features == ["atan2_adams", "spectral_decay"]
    text = (ROOT / "specs" / "adams.yaml").read_text()
    assert "atan2(" not in text.split("update:")[1]  # the maths divides; the feature bounds it
    assert any(n.op == "atan2" for s in walk_stmts(prog.body) if isinstance(s, Assign) for n in walk_nodes(s.value))
