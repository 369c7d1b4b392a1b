"""Bad specs: each must fail with a message naming file:line:column, the field, and the problem."""

from __future__ import annotations

import textwrap

import pytest

from optgen.errors import SpecError
from optgen.ir.hoist import hoist
from optgen.pipeline import lower
from optgen.spec.loader import load_spec

BASE = """\
name: demo
class: Demo
hyperparameters:
  lr: {default: 1.0e-3, min: 0}
  betas: {default: [0.9, 0.999], as: [beta1, beta2]}
state:
  m: {kind: element}
update:
  - m = lerp(m, grad, 1 - beta1)
  - param = param - lr * m
"""

GLOBALS = BASE.replace("update:", """globals:
  d: {init: 1.0}
accumulators:
  n: {init: 0.0}
update:""") + """  - n += sum(m)
finalize:
  - d = d * n
"""

# (name, spec text, expected "line:col: field: message" fragment)
CASES = [
    ("unknown name", BASE.replace("1 - beta1)", "1 - bta1)"),
     "9:27: update[0]: unknown name 'bta1' (did you mean 'beta1'?)"),
    ("unknown function", BASE.replace("lerp(", "lurp("), "9:9: update[0]: unknown function 'lurp' (did you mean 'lerp'?)"),
    ("wrong arity", BASE.replace("lerp(m, grad, 1 - beta1)", "lerp(m, grad)"), "9:9: update[0]: lerp() takes 3 arguments, got 2"),
    ("syntax error", BASE.replace("- param = param - lr * m", "- param = param - * m"), "10:21: update[1]: syntax error: invalid syntax"),
    ("not an assignment", BASE.replace("- param = param - lr * m", "- param - lr * m"),
     "10:5: update[1]: expected an assignment 'name = expression'"),
    ("attribute access", BASE.replace("lr * m", "lr.real * m"), "10:21: update[1]: attribute access not allowed"),
    ("lambda", BASE.replace("- param = param - lr * m", "- 'param = param - lr.item() * m'"), "10:22: update[1]: only calls of library functions by name"),
    ("subscript", BASE.replace("lr * m", "betas[0] * m"), "10:21: update[1]: subscripts not allowed"),
    ("assign to hyperparameter", BASE.replace("- param = param - lr * m", "- lr = lr * 2"),
     "10:5: update[1]: cannot assign to hyperparameter 'lr'"),
    ("assign to step", BASE.replace("- param = param - lr * m", "- step = step + 1"), "update[1]: cannot assign to 'step'"),
    ("param kind", BASE.replace("- param = param - lr * m", "- param = sum(m)"),
     "update[1]: 'param' is per-element, but the value is per-tensor"),
    ("state kind", BASE.replace("- param = param - lr * m", "- m = sum(m)"),
     "update[1]: state 'm' is per-element, but the value is per-tensor"),
    ("row plus col", BASE.replace("m: {kind: element}", "m: {kind: element}\n  r: {kind: row}\n  c: {kind: col}")
     .replace("- param = param - lr * m", "- x = r + c"), "update[1]: cannot combine a per-row and a per-column value"),
    ("device condition", BASE.replace("  - param = param - lr * m", "  - if: m > 0\n    then: [param = param - lr * m]"),
     "10:9: update[1].if: a condition must be decided per parameter, but this one is per-element"),
    ("one-branch temp", BASE.replace("  - param = param - lr * m",
     "  - if: lr > 0\n    then: [d = m]\n  - param = param - lr * d"),
     "update[2]: 'd' is assigned in only one branch of a conditional above"),
    ("unknown top-level field", BASE.replace("class: Demo", "class: Demo\nupdates: []"),
     "3:1: updates: unknown field 'updates' (did you mean 'update'?)"),
    ("unknown hyperparameter field", BASE.replace("min: 0}", "minimum: 0}"),
     "4:25: hyperparameters.lr.minimum: unknown field 'minimum' (did you mean 'min'?)"),
    ("bad state kind", BASE.replace("m: {kind: element}", "m: {kind: elementwise}"),
     "7:13: state.m.kind: Input should be 'element', 'row', 'col', 'matrix', 'tensor', 'host' or 'slice'"),
    ("missing update", BASE.split("update:")[0], "update: required field is missing"),
    ("bad name", BASE.replace("name: demo", "name: Demo-1"), "1:7: name: name 'Demo-1' must be lower_snake_case"),
    ("reserved name", BASE.replace("m: {kind: element}", "grad: {kind: element}"), "state: 'grad' is reserved"),
    ("as length", BASE.replace("as: [beta1, beta2]", "as: [beta1, beta2, beta3]"),
     "5:10: hyperparameters.betas: default must be a list of 3 values to match 'as'"),
    ("bool default not bool", BASE.replace("lr: {default: 1.0e-3, min: 0}", "lr: {default: yes please, type: float}"),
     "hyperparameters.lr: default 'yes please' is not a number"),
    ("duplicate key", BASE.replace("  lr: {default: 1.0e-3, min: 0}", "  lr: {default: 1.0e-3, min: 0}\n  lr: {default: 1}"),
     "5:3: hyperparameters.lr: duplicate key 'lr'"),
    ("invalid yaml", BASE.replace("class: Demo", "class: [Demo"), "invalid YAML"),
    ("unknown feature", BASE.replace("class: Demo", "class: Demo\nfeatures: [maximise]"),
     "3:12: features[0]: unknown feature 'maximise' (did you mean 'maximize'?)"),
    ("feature without its anchors", BASE.replace("class: Demo", "class: Demo\nfeatures: [maximize, atan2]"),
     "3:22: features[1]: feature 'atan2' needs a denominator 'd = x + eps' (role 'denominator': declare it under roles:)"),
    ("nesterov without an EMA", BASE.replace("class: Demo", "class: Demo\nfeatures: [nesterov]"),
     "3:12: features[0]: feature 'nesterov' needs a first-moment EMA 'm = lerp(m, x, w)' or 'm = m * beta1 + "
     "(c * (1 - beta1)) * x' (role 'first_moment': declare it under roles:)"),
    # the flags' conflicts are construction-time checks (tests/test_simplified_flag.py); the order is the spec's
    ("simplified_ademamix before grams", BASE.replace("class: Demo", "class: Demo\nfeatures: [simplified_ademamix, grams]"),
     "3:12: features[0]: feature 'simplified_ademamix' must come after 'grams' (features[1])"),
    ("simplified_ademamix before atan2", BASE.replace("class: Demo", "class: Demo\nfeatures: [simplified_ademamix, atan2]"),
     "3:12: features[0]: feature 'simplified_ademamix' must come after 'atan2' (features[1])"),
    ("ademamix without a moment", BASE.replace("class: Demo", "class: Demo\nfeatures: [ademamix]"),
     "3:12: features[0]: feature 'ademamix' needs a first-moment EMA 'm = lerp(m, x, w)' or 'm = m * beta1 + "
     "(c * (1 - beta1)) * x' (role 'first_moment': declare it under roles:)"),
    ("string compared with <", BASE.replace("- param = param - lr * m", "- param = param - lr * m\n  - if: lr < 'x'\n    then: [m = m]"),
     "11:9: update[2].if: 'x' can only be compared with == or !="),
    ("string in maths", BASE.replace("lr * m", "'x' * m"),
     "10:21: update[1]: 'x' is only allowed compared (== / !=) with a non-numeric hyperparameter"),
    ("cautious_wd without decay", BASE.replace("class: Demo", "class: Demo\nfeatures: [cautious_wd]"),
     "3:12: features[0]: feature 'cautious_wd' needs a decoupled decay 'param = param + s * param'"),
    ("unknown extends", BASE.replace("class: Demo", "class: Demo\nextends: adamm"),
     "3:10: extends: unknown spec 'adamm'"),
    ("bad state init", BASE.replace("m: {kind: element}", "m: {kind: element, init: zero}"),
     "7:28: state.m.init: init must be zeros, ones, absent, param, a number or a hyperparameter name, got 'zero' (did you mean 'zeros'?)"),
    ("has of non-state", BASE.replace("  - param = param - lr * m", "  - if: has(lr)\n    then: [param = param - lr * m]"),
     "10:13: update[1].if: has() takes the name of a state buffer"),
    ("string constant", BASE.replace("lr * m", "'lr' * m"), "update[1]: 'lr' is only allowed compared (== / !=) with a non-numeric hyperparameter, or as param_attr's"),
    ("non-numeric hyper in maths", BASE.replace("min: 0}", "min: 0}\n  group: {default: null, type: any}")
     .replace("lr * m", "group * m"), "update[1]: hyperparameter 'group' is not a number"),
    ("unpinned match", BASE.replace("class: Demo", "class: Demo\nmatches: {package: torch, class: torch.optim.SGD}"),
     "matches.package: package 'torch' must be pinned as name==version"),
    ("published attribute not a hyperparameter", BASE.replace("class: Demo", "class: Demo\nmatches:\n"
     "  package: torch==2.0.0\n  class: torch.optim.SGD\n  state_dict: {attributes: [nesterov]}"),
     "matches.state_dict.attributes[0]: 'nesterov' is not a per-group hyperparameter of Demo"),
    ("published code book of a non-state", BASE.replace("class: Demo", "class: Demo\nstate_dict:\n"
     "  state: {qmap1: {codebook: m2}}"), "state_dict.state.qmap1.codebook: 'm2' is not a state of Demo"),
    ("published entry without value or code book", BASE.replace("class: Demo", "class: Demo\nstate_dict:\n"
     "  state: {qmap1: {if: lr > 0}}"), "state_dict.state.qmap1: an entry takes either a value or a codebook"),
    ("published rename of a non-state", BASE.replace("class: Demo", "class: Demo\nstate_dict:\n"
     "  rename: {m_absmax: absmax1}"), "state_dict.rename.m_absmax: 'm_absmax' is not a state of Demo"),
    ("device exponent", BASE.replace("lr * m", "lr * 2 ** m"), "10:31: update[1]: the exponent of a device value must be a host scalar"),
    ("condition not boolean", BASE.replace("  - param = param - lr * m", "  - if: lr\n    then: [param = param - lr * m]"),
     "10:9: update[1].if: a condition must be true or false"),
    ("bad check", BASE.replace("state:", "checks:\n  - {check: lr + 1, message: 'no'}\nstate:"),
     "checks: a check must be a true/false expression"),
    ("chained comparison", BASE.replace("  - param = param - lr * m", "  - if: 0 < lr < 1\n    then: [param = param - lr * m]"),
     "update[1].if: chained comparisons are not allowed"),
    ("constructor_order unknown", BASE.replace("class: Demo", "class: Demo\nconstructor_order: [lr, betaz]"),
     "constructor_order[1]: unknown hyperparameter 'betaz' (did you mean 'betas'?)"),
    ("keyword call", BASE.replace("lerp(m, grad, 1 - beta1)", "lerp(m, grad, w=0.1)"), "update[0]: lerp(): keyword arguments are not allowed"),
    ("factored form without the feature", BASE.replace("  m: {kind: element}", "  m: {kind: element, factored: {row: r, col: c}}"),
     "7:32: state.m.factored: a factored form needs feature 'factored' under features:"),
    ("factored form of a row state", BASE.replace("state:", "features: [factored]\nstate:").replace(
        "  m: {kind: element}", "  m: {kind: element}\n  s: {kind: row, factored: {row: r, col: c}}"),
     "state.s.factored: only per-element states can be factored"),
    ("factored without a factored state", BASE.replace("state:", "features: [factored]\nstate:"),
     "features[0]: feature 'factored' needs a per-element state with a 'factored: {row, col}' form"),
    ("factored name taken", BASE.replace("state:", "features: [factored]\nstate:").replace(
        "  m: {kind: element}", "  m: {kind: element, factored: {row: m, col: c}}"),
     "features[0]: state 'm': factored state name 'm' is already a state"),
    # optimizer-wide accumulators, globals and finalize (Prodigy's D-adaptation), per-slice values
    ("+= to a non-accumulator", BASE.replace("- param = param - lr * m", "- m += m"),
     "10:5: update[1]: 'm' is not an accumulator: '+=' adds to one declared under accumulators:"),
    ("accumulate a per-element value", GLOBALS.replace("- n += sum(m)", "- n += m"),
     "update[2]: an accumulator adds one per-tensor device value per parameter, but the value is per-element"),
    ("read an accumulator in update", GLOBALS.replace("- n += sum(m)", "- m = m * n"),
     "update[2]: accumulator 'n' is only added to here ('n += value'); finalize: reads its sum"),
    ("assign a global in update", GLOBALS.replace("- n += sum(m)", "- d = 2"),
     "update[2]: global 'd' is written only by finalize:"),
    ("finalize reads the parameter", GLOBALS.replace("- d = d * n", "- d = d * sum(param)"),
     "finalize[0]: 'param' is per parameter; finalize: sees hyperparameters, globals, accumulators"),
    ("finalize accumulates", GLOBALS.replace("- d = d * n", "- n += 1"),
     "finalize[0]: finalize: reads accumulators; '+=' belongs in update:"),
    ("accumulators without finalize", GLOBALS.split("finalize:")[0],
     "finalize: accumulators need finalize: statements that read them"),
    ("strided without slice_stride", BASE.replace("- param = param - lr * m", "- x = strided(grad)"),
     "update[1]: strided() needs 'slice_stride:' (the hyperparameter k) in the spec"),
    ("slice state without slice_stride", BASE.replace("  m: {kind: element}", "  m: {kind: element}\n  s: {kind: slice}"),
     "state.s.kind: a per-slice state needs 'slice_stride:'"),
    ("slice plus element", BASE.replace("class: Demo", "class: Demo\nslice_stride: lr").replace(
        "- param = param - lr * m", "- x = strided(grad) + m"), "update[1]: cannot combine a per-slice-element and a per-element"),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in CASES], ids=[n for n, _, _ in CASES])
def test_bad_spec(tmp_path, text: str, expected: str) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(SpecError) as info:
        hoist(lower(load_spec(path, display_path="demo.yaml")))
    message = str(info.value)
    assert message.startswith("demo.yaml:"), message
    assert expected in message, message


def test_enough_cases() -> None:
    assert len(CASES) >= 25


def test_base_is_valid(tmp_path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(BASE)
    program = hoist(lower(load_spec(path)))
    assert program.class_name == "Demo"
