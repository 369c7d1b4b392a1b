"""Features bound to roles, the rest of issue 15 item 1: nesterov, amsgrad, normed_momentum,
ademamix, simplified_ademamix, fisher_wd, kourkoutas_beta, centered_wd, orthograd,
stochastic_rounding and coupled, each by itself on two bases written here with names and
spellings unlike the published specs (no ``exp_avg``, ``denom`` or ``update``; eps first in one
denominator; a scaled axpy EMA and a bare-name direction in the other), checked against an eager
reference written here from math/adv-optm.md and math/torch-adams-adamw-family.md, plus an error
case each (a missing or duplicated role, or a declared statement of the wrong form, reported at
the spec's file:line:column); factored and state_precision refuse a spec name among their
temporaries.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from optgen.errors import SpecError
from optgen.ir.nodes import Assign, walk_stmts
from optgen.pipeline import lower
from optgen.render import compile_spec
from optgen.smoke import import_built
from optgen.spec.loader import load_spec
from tests.models import make_model, max_diffs, train

# An Adam with its own names: m1 / v2, the denominator q with eps first, the direction 'heading'
# (a copy, divided, then scaled by lr / c1), decoupled decay then the write.
ODD_ADAM = """
name: {name}
class: OddAdam
hyperparameters:
  lr: {{default: 1.0e-2}}
  betas: {{default: [0.9, 0.99], as: [k1, k2]}}
  eps: {{default: 1.0e-8}}
  wd: {{default: 0.05}}
features: {features}
{roles}
state:
  m1: {{kind: element, init: zeros}}
  v2: {{kind: element, init: zeros}}
{extra_state}
update:
{extra}
  - v2 = v2 * k2 + (1 - k2) * grad * grad
  - c1 = 1 - k1 ** step
  - c2 = 1 - k2 ** step
  - q = eps + sqrt(v2 / c2)
  - m1 = lerp(m1, grad, 1 - k1)
  - heading = copy(m1)
  - heading = heading / q
  - heading = heading * (lr / c1)
  - param = param + (-(wd * lr)) * param
  - param = param - heading
"""
ODD_ADAM_ROLES = ("roles: {first_moment: m1, second_moment: v2, direction: 'heading#1', denominator: q, "
                  "step_size: 'heading#3', decay: 'param#1'}")

# A Prodigy-like base: the EMAs scaled by a gain (acc * r1 + (gain * (1 - r1)) * grad), the
# direction a bare name (push = acc), the step size on the left (lr * push), decay spelled
# param - (wd * lr) * param.
SCALED = """
name: {name}
class: Scaled
hyperparameters:
  lr: {{default: 1.0e-2}}
  betas: {{default: [0.9, 0.99], as: [r1, r2]}}
  gain: {{default: 0.5}}
  eps: {{default: 1.0e-8}}
  wd: {{default: 0.05}}
features: {features}
{roles}
state:
  acc: {{kind: element, init: zeros}}
  sq: {{kind: element, init: zeros}}
{extra_state}
update:
{extra}
  - sq = sq * r2 + (gain * gain * (1 - r2)) * grad * grad
  - den = sqrt(sq) + gain * eps
  - acc = acc * r1 + (gain * (1 - r1)) * grad
  - push = acc
  - push = push / den
  - push = lr * push
  - param = param - (wd * lr) * param
  - param = param - push
"""
SCALED_ROLES = ("roles: {first_moment: acc, second_moment: sq, direction: 'push#1', denominator: den, "
                "step_size: 'push#3', decay: 'param#1'}")

BASES = {"adam": (ODD_ADAM, ODD_ADAM_ROLES), "scaled": (SCALED, SCALED_ROLES)}
STEPS = 12


def _write(tmp_path, base: str, features: list[str], roles: str | None = None, extra: str = "",
           extra_state: str = "", name: str | None = None):
    template, declared = BASES[base]
    name = name or f"{base}_{'_'.join(features) or 'plain'}"
    text = textwrap.dedent(template).format(name=name, features=features, roles=declared if roles is None else roles,
                                            extra=extra, extra_state=extra_state)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def _line(path, text: str) -> int:
    """The 1-based line of the spec that holds ``text`` (once)."""
    hits = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if text in line]
    assert len(hits) == 1, (text, hits)
    return hits[0]


def _error(path) -> SpecError:
    with pytest.raises(SpecError) as exc:
        lower(load_spec(path))
    e = exc.value
    assert e.position is not None and e.position.file == str(path) and e.position.column >= 1
    return e


def _cls(path):
    built = compile_spec(path)
    return getattr(import_built(built, built.module), built.program.class_name)


# -- the eager reference ---------------------------------------------------------------------------
def _orthograd(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """math/adv-optm.md §2.6, flattened: project out w, keep the norm; in float32, cast back."""
    w32, g32 = w.float(), g.float()
    wf, gf = w32.reshape(-1), g32.reshape(-1)
    proj = torch.dot(wf, gf) / (torch.dot(wf, wf) + 1e-30)
    g_orth = g32 - w32 * proj
    return (g_orth * (g32.norm() / (g_orth.norm() + 1e-30))).to(g.dtype)


class Ref(torch.optim.Optimizer):
    """Both bases, eagerly, with each feature as math/ describes it (one at a time)."""

    def __init__(self, params, base: str, lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, wd=0.05, gain=0.5, **feature):
        super().__init__(params, dict(lr=lr))
        self.base, self.h = base, dict(b1=b1, b2=b2, eps=eps, wd=wd, gain=gain)
        self.f = feature
        self.buckets: dict = {}  # Kourkoutas-beta: shape -> [r_ema (float32), params]

    def _kourkoutas(self) -> None:
        """The dynamic beta2 of each bucket from the previous step's pooled sum(g^2) (math §2.7)."""
        alpha, tiny, lo, hi = self.f["ema_alpha"], self.f["tiny_spike"], self.f["beta2_min"], self.h["b2"]
        for p in self.param_groups[0]["params"]:
            self.buckets.setdefault(tuple(p.shape), [torch.zeros((), dtype=torch.float32), []])[1].append(p)
        for r_ema, ps in self.buckets.values():
            acc = torch.zeros((), dtype=torch.float32)
            for p in ps:
                st = self.state[p]
                if "sq" in st:
                    acc += st["sq"]
            n = torch.sqrt(acc)
            r_ema.mul_(alpha).add_(n, alpha=1.0 - alpha)
            raw = n / (r_ema + tiny)
            target = hi - (hi - lo) * (raw / (1.0 + raw))
            beta2 = (0.0 * hi + 1.0 * target).item()  # adv_optm's blend with weight 1 (no warm-up)
            for p in ps:
                self.state[p]["beta2"] = beta2
            ps.clear()

    @torch.no_grad()
    def step(self):
        f, h, lr0 = self.f, self.h, self.param_groups[0]["lr"]
        b1, b2, eps, wd, gain = h["b1"], h["b2"], h["eps"], h["wd"], h["gain"]
        if f.get("kourkoutas"):
            self._kourkoutas()
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            st, lr = self.state[p], lr0
            if "t" not in st:
                st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p), vmax=torch.zeros_like(p),
                          slow=torch.zeros_like(p), anchor=p.clone())
            st["t"] += 1
            t, m, v = st["t"], st["m"], st["v"]
            g = p.grad.clone()
            if f.get("orthograd"):
                g = _orthograd(p, g)
            k2 = st.get("beta2", b2) if f.get("kourkoutas") else b2
            if f.get("kourkoutas"):
                st["sq"] = (g * g).sum().float()
            scale = 1.0 if self.base == "adam" else gain * gain
            v.mul_(k2).addcmul_(g, g, value=scale * (1 - k2))
            vq = torch.maximum(st["vmax"], v) if f.get("amsgrad") else v
            st["vmax"] = vq
            if f.get("coupled"):
                vq = vq.mean() if p.ndim < 2 else vq.reshape(p.shape[0], -1).mean(0).reshape(1, *p.shape[1:])
            if self.base == "adam":
                q = eps + (vq / (1 - b2 ** t)).sqrt()
            else:
                q = vq.sqrt() + gain * eps
            if f.get("normed"):
                g = g / q
            c = 1.0 if self.base == "adam" else gain  # the first moment's input scale
            if f.get("simplified"):
                m.mul_(b1).add_(c * g)
                d = m + (f["alpha_grad"] * c) * g
                lr = lr / ((1 - b1 ** t) / (1 - b1) + f["alpha_grad"])
            else:
                if self.base == "adam":
                    m.lerp_(g, 1 - b1)
                else:
                    m.mul_(b1).add_(g, alpha=c * (1 - b1))
                d = m.lerp(g, 1 - b1) if f.get("nesterov") else m.clone()
            if f.get("ademamix"):
                b3 = f["beta3"]
                if self.base == "adam":
                    st["slow"].lerp_(g, 1 - b3)
                else:
                    st["slow"].mul_(b3).add_(g, alpha=c * (1 - b3))
                d = d + f["alpha"] * st["slow"]
            if not f.get("normed"):
                d = d / q
            d = d * (lr / (1 - b1 ** t)) if self.base == "adam" else lr * d
            if f.get("fisher"):
                s = 1 / q
                s = s / torch.clamp((p * s).pow(2).mean().sqrt(), min=1.0)
                p.sub_(p * (s * (wd * lr)))
            else:
                p.add_(p, alpha=-(wd * lr))
            if f.get("centered"):
                p.add_(p - st["anchor"], alpha=-(f["centered"] * lr))
            p.sub_(d)


def _compare(tmp_path, base, features, ours_kw, ref_kw, model="mlp", tol=1e-10, **write):
    """The feature on ``base`` against the eager reference (float64, STEPS steps), and the run
    differs from the base without the feature (the feature did something)."""
    cls = _cls(_write(tmp_path, base, features, **write))
    dtype = torch.float64
    ours, _ = train(make_model(model, dtype), lambda ps: cls(ps, **ours_kw), STEPS, dtype)
    ref, _ = train(make_model(model, dtype), lambda ps: Ref(ps, base, **ref_kw), STEPS, dtype)
    plain, _ = train(make_model(model, dtype), lambda ps: Ref(ps, base), STEPS, dtype)
    assert max_diffs(ours, ref)[0] < tol
    assert max_diffs(ours, plain)[0] > 1e-6
    off, _ = train(make_model(model, dtype), lambda ps: cls(ps), STEPS, dtype)  # flags off: the base
    assert max_diffs(off, plain)[0] < tol


# -- nesterov ------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "scaled"])
def test_nesterov_on_two_bases_matches_the_reference(tmp_path, base) -> None:
    _compare(tmp_path, base, ["nesterov"], dict(nesterov=True), dict(nesterov=True))


def test_nesterov_needs_its_roles_and_one_first_moment(tmp_path) -> None:
    path = _write(tmp_path, "adam", ["nesterov"], roles="")
    e = _error(path)
    assert "role 'first_moment'" in e.message and e.position.line == _line(path, "features:")
    # the dialect's names, two EMAs of exp_avg: several first moments, both lines named
    text = textwrap.dedent("""
        name: two
        class: Two
        hyperparameters:
          lr: {default: 1.0e-3}
          beta1: {default: 0.9}
        features: [nesterov]
        state:
          exp_avg: {kind: element, init: zeros}
        update:
          - exp_avg = lerp(exp_avg, grad, 1 - beta1)
          - exp_avg = lerp(exp_avg, grad, 1 - beta1)
          - update = copy(exp_avg)
          - param = param - lr * update
        """)
    path = tmp_path / "two.yaml"
    path.write_text(text)
    e = _error(path)
    assert "matches several statements (line 11, line 12)" in e.message and e.position.line == 11


# -- amsgrad ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "scaled"])
def test_amsgrad_on_two_bases_matches_the_reference(tmp_path, base) -> None:
    _compare(tmp_path, base, ["amsgrad"], dict(amsgrad=True), dict(amsgrad=True))


def test_amsgrad_declared_denominator_of_the_wrong_form_is_an_error_at_its_line(tmp_path) -> None:
    path = _write(tmp_path, "adam", ["amsgrad"], roles="roles: {second_moment: v2, denominator: c2}")
    e = _error(path)
    assert "is not a denominator" in e.message and e.position.line == _line(path, "- c2 = ")
    e = _error(_write(tmp_path, "scaled", ["amsgrad"], roles="", name="scaled_undeclared"))
    assert "role 'denominator'" in e.message


# -- normed_momentum -------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "scaled"])
def test_normed_momentum_on_two_bases_matches_the_reference(tmp_path, base) -> None:
    _compare(tmp_path, base, ["normed_momentum"], dict(normed_momentum=True), dict(normed=True))


def test_normed_momentum_two_divisions_by_the_denominator_is_an_error_naming_both(tmp_path) -> None:
    path = _write(tmp_path, "adam", ["normed_momentum"])
    path.write_text(path.read_text().replace("  - heading = heading / q\n", "  - heading = heading / q\n" * 2))
    e = _error(path)
    first = _line(path, "- heading = copy(m1)") + 1
    assert f"matches several statements (line {first}, line {first + 1})" in e.message
    assert e.position.line == first
    e = _error(_write(tmp_path, "scaled", ["normed_momentum"], roles="", name="scaled_undeclared"))
    assert "a division of the direction by the denominator" in e.message


# -- ademamix --------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "scaled"])
def test_ademamix_on_two_bases_matches_the_reference(tmp_path, base) -> None:
    _compare(tmp_path, base, ["ademamix"], dict(use_AdEMAMix=True, beta3_ema=0.95, alpha=2.0),
             dict(ademamix=True, beta3=0.95, alpha=2.0))


def test_ademamix_keeps_its_state_name_and_needs_a_first_moment(tmp_path) -> None:
    e = _error(_write(tmp_path, "adam", ["ademamix"], extra_state="  exp_avg_slow: {kind: element, init: zeros}"))
    assert "keeps state 'exp_avg_slow'" in e.message
    e = _error(_write(tmp_path, "scaled", ["ademamix"], roles="roles: {direction: 'push#1'}"))
    assert "role 'first_moment'" in e.message


# -- simplified_ademamix -------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "scaled"])
def test_simplified_ademamix_on_two_bases_matches_the_reference(tmp_path, base) -> None:
    _compare(tmp_path, base, ["simplified_ademamix"], dict(Simplified_AdEMAMix=True, alpha_grad=2.0),
             dict(simplified=True, alpha_grad=2.0))


def test_simplified_ademamix_refuses_an_unscaled_axpy_moment_at_its_line(tmp_path) -> None:
    path = _write(tmp_path, "scaled", ["simplified_ademamix"])
    path.write_text(path.read_text().replace("(gain * (1 - r1)) * grad", "(1 - r1) * grad"))
    e = _error(path)
    assert "is not a first-moment EMA" in e.message and e.position.line == _line(path, "- acc = ")


def test_simplified_ademamix_lr_temporary_does_not_capture_a_spec_name(tmp_path) -> None:
    path = _write(tmp_path, "adam", ["simplified_ademamix"], extra="  - lr_sim = grad * 0\n")
    prog = lower(load_spec(path))
    mine = [s for s in walk_stmts(prog.body) if isinstance(s, Assign) and s.target == "lr_sim"]
    assert len(mine) == 1 and mine[0].pos is not None  # the spec's own, written once
    assert [s for s in walk_stmts(prog.body) if isinstance(s, Assign) and s.target == "_lr_sim"]


# -- fisher_wd -------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "scaled"])
def test_fisher_wd_on_two_bases_matches_the_reference(tmp_path, base) -> None:
    _compare(tmp_path, base, ["fisher_wd"], dict(fisher_wd=True, wd=0.5), dict(fisher=True, wd=0.5))


def test_fisher_wd_declared_torch_style_decay_is_an_error_at_its_line(tmp_path) -> None:
    path = _write(tmp_path, "adam", ["fisher_wd"])
    path.write_text(path.read_text().replace("param + (-(wd * lr)) * param", "param * (1 - lr * wd)"))
    e = _error(path)
    assert "is not a decoupled decay" in e.message and e.position.line == _line(path, "param * (1 - lr * wd)")


# -- kourkoutas_beta -----------------------------------------------------------------------------
KOURKOUTAS = dict(ema_alpha=0.9, tiny_spike=1e-9, beta2_min=0.8)


@pytest.mark.parametrize("base", ["adam", "scaled"])
def test_kourkoutas_beta_on_two_bases_matches_the_reference(tmp_path, base) -> None:
    _compare(tmp_path, base, ["kourkoutas_beta"], dict(kourkoutas_beta=True, **KOURKOUTAS),
             dict(kourkoutas=True, **KOURKOUTAS))


def test_kourkoutas_beta_declared_second_moment_of_the_wrong_form_is_an_error(tmp_path) -> None:
    path = _write(tmp_path, "adam", ["kourkoutas_beta"], roles="roles: {second_moment: m1}")
    e = _error(path)
    assert "is not a second-moment EMA" in e.message and e.position.line == _line(path, "- m1 = lerp")


# -- centered_wd -----------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "scaled"])
def test_centered_wd_on_two_bases_matches_the_reference(tmp_path, base) -> None:
    _compare(tmp_path, base, ["centered_wd"], dict(centered_wd=0.3, centered_wd_mode="full"), dict(centered=0.3))


def test_centered_wd_declared_decay_of_the_wrong_form_and_its_state_name(tmp_path) -> None:
    path = _write(tmp_path, "scaled", ["centered_wd"])
    path.write_text(path.read_text().replace("param - (wd * lr) * param", "param * (1 - lr * wd)"))
    e = _error(path)
    assert "is not a decoupled decay" in e.message and e.position.line == _line(path, "param * (1 - lr * wd)")
    e = _error(_write(tmp_path, "adam", ["centered_wd"], extra_state="  anchor_data: {kind: element, init: zeros}"))
    assert "keeps state 'anchor_data'" in e.message


def test_centered_wd_target_does_not_capture_a_spec_name(tmp_path) -> None:
    path = _write(tmp_path, "adam", ["centered_wd"], extra="  - cwd_target = grad * 2\n")
    prog = lower(load_spec(path))
    assert len([s for s in walk_stmts(prog.body) if isinstance(s, Assign) and s.target == "cwd_target"]) == 1
    assert [s for s in walk_stmts(prog.body) if isinstance(s, Assign) and s.target == "_cwd_target"]


# -- orthograd -------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "scaled"])
def test_orthograd_on_two_bases_matches_the_reference(tmp_path, base) -> None:
    # the spec's own temporary 'ortho_g' (written first, read by nothing) is not OrthoGrad's
    # float32 arithmetic (as published) on float64 parameters: float32 roundings, not 1e-10
    _compare(tmp_path, base, ["orthograd"], dict(orthogonal_gradient=True), dict(orthograd=True),
             extra="  - ortho_g = grad * 3\n", tol=1e-5)


def test_orthograd_needs_a_parameter_write(tmp_path) -> None:
    path = _write(tmp_path, "adam", ["orthograd"], roles="")
    path.write_text(path.read_text().replace("  - param = param + (-(wd * lr)) * param\n", "")
                    .replace("  - param = param - heading\n", "  - m1 = m1 - heading\n"))
    e = _error(path)
    assert "orthograd" in e.message and e.position.line == _line(path, "features:")


# -- coupled -------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "scaled"])
def test_coupled_on_two_bases_matches_the_reference(tmp_path, base) -> None:
    _compare(tmp_path, base, ["coupled"], dict(coupled=True), dict(coupled=True))


def test_coupled_needs_the_second_moment_role(tmp_path) -> None:
    e = _error(_write(tmp_path, "scaled", ["coupled"], roles="roles: {denominator: den}"))
    assert "role 'second_moment'" in e.message


# -- stochastic_rounding ---------------------------------------------------------------------------
def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each float32 ``x`` (both ``x`` where exact)."""
    near = x.to(torch.bfloat16).float()
    up = torch.nextafter(near.to(torch.bfloat16), torch.tensor(math.inf, dtype=torch.bfloat16)).float()
    down = torch.nextafter(near.to(torch.bfloat16), torch.tensor(-math.inf, dtype=torch.bfloat16)).float()
    lo = torch.where(near <= x, near, down)
    hi = torch.where(near >= x, near, up)
    return lo, hi


@pytest.mark.parametrize("base", ["adam", "scaled"])
def test_stochastic_rounding_on_two_bases_rounds_the_float32_write(tmp_path, base) -> None:
    """One step on bf16 parameters: every element is one of the two bf16 neighbours of the write
    done in float32 (math/adv-optm.md §2.3), with the update (computed in bf16, as the spec's
    states follow the parameter) known within its own bf16 rounding; some round down, some up."""
    path = _write(tmp_path, base, ["stochastic_rounding"], extra="  - param_fp32 = grad * 0\n")
    prog = lower(load_spec(path))
    assert len([s for s in walk_stmts(prog.body) if isinstance(s, Assign) and s.target == "param_fp32"]) == 1
    cls = _cls(path)
    torch.manual_seed(0)
    w = torch.randn(64, 48).to(torch.bfloat16)
    p = torch.nn.Parameter(w.clone())
    p.grad = torch.randn(64, 48).to(torch.bfloat16)
    opt = cls([p], lr=0.3, wd=0.1)
    opt.step()
    ref = Ref([torch.nn.Parameter(w.double())], base, lr=0.3, wd=0.1)
    ref.param_groups[0]["params"][0].grad = p.grad.double()
    ref.step()
    exact = ref.param_groups[0]["params"][0].detach()  # the write in float64 from the bf16 inputs
    upd = (w.double() - exact).abs()
    slack = upd * 2.0 ** -4 + w.double().abs() * 2.0 ** -24  # the bf16 update's and the fp32 write's rounding
    lo, _ = _neighbours((exact - slack).float())
    _, hi = _neighbours((exact + slack).float())
    got = p.detach().float()
    assert p.dtype == torch.bfloat16 and bool(((got >= lo) & (got <= hi)).all())
    nearest = exact.to(torch.bfloat16).float()
    assert bool((got < nearest).any()) and bool((got > nearest).any())  # not round-to-nearest


def test_stochastic_rounding_needs_a_parameter_write(tmp_path) -> None:
    path = _write(tmp_path, "scaled", ["stochastic_rounding"], roles="")
    path.write_text(path.read_text().replace("  - param = param - (wd * lr) * param\n", "")
                    .replace("  - param = param - push\n", "  - acc = acc - push\n"))
    e = _error(path)
    assert "stochastic_rounding" in e.message and e.position.line == _line(path, "features:")


# -- storage transforms: their temporaries never capture a spec name --------------------------------
def test_factored_and_state_precision_refuse_a_spec_name_among_their_temporaries(tmp_path) -> None:
    path = _write(tmp_path, "adam", ["factored"], extra="  - m1_full = grad * 0\n")
    path.write_text(path.read_text().replace("  m1: {kind: element, init: zeros}",
                                             "  m1: {kind: element, init: zeros, factored: {row: m1_r, col: m1_c, "
                                             "sign: m1_s}}"))
    e = _error(path)
    assert "'m1_full', which is taken" in e.message and e.position.line == _line(path, "features:")
    e = _error(_write(tmp_path, "scaled", ["state_precision"], extra="  - acc_work = grad * 0\n"))
    assert "'acc_work', which is taken" in e.message
