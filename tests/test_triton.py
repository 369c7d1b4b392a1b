"""The triton backend against the reference backend, for every spec.

On a machine without a GPU the kernels run through Triton's interpreter on CPU tensors (conftest
sets TRITON_INTERPRET=1); with a GPU the same tests run on CUDA. 20 steps on a parameter list with
0-D, 1-D, 2-D, 3-D batched and empty tensors and sizes that are not multiples of the block.

Tolerances (stated per storage dtype): the triton backend computes in fp32 with its own atan2 and
its own summation order for reductions, so it is not bit-identical to the reference's torch ops.
fp32: |diff| <= 2e-6 * (1 + |p|) after 20 steps, about 16 ulp at unit scale, far below any real
departure (a wrong coefficient or a missed bias correction moves params by >= 1e-4). bf16: the
oracle is the reference backend in fp32 with params and states rounded to bf16 after every step
(exactly the triton backend's storage rule); rounding ties decided differently by one fp32 ulp
flip single values by one bf16 ulp (on a GPU also fused multiply-adds), so the test allows 2 bf16
ulps (of the value, or of 0.02 where an O(lr) update cancelled it) on at most 1% of the values.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from optgen.ir.nodes import Kind
from optgen.spec.loader import load_spec
from tests.published import ROOT, dtype_argument, matched_specs, settings

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Every spec checked against a published implementation, by module name -> class name.
ALL_SPECS = {name: load_spec(ROOT / "specs" / f"{name}.yaml").model.class_ for name in matched_specs()}
#: specs the triton backend cannot run at all (the generated module says why): refused at
#: construction (test_spec_without_kernels_is_refused_at_construction), not compared
NO_KERNELS = {name: cls for name, cls in ALL_SPECS.items()
              if importlib.import_module(f"generated.{name}_triton").PLAN is None}
SPECS = {name: cls for name, cls in ALL_SPECS.items() if name not in NO_KERNELS}
#: 0-D, 1-D (not a multiple of the 256-element interpreter block), 2-D, (1, N), (M, 1), 3-D batched,
#: empty, and a matrix spanning several tiles of each kind.
SHAPES = [(), (300,), (5, 7), (1, 9), (9, 1), (3, 4, 6), (0,), (0, 4), (40, 33), (17,)]
STEPS = 20
#: Muon orthogonalises in bfloat16 (as published): an input 1e-7 away from the reference's can round
#: to the other bf16 neighbour and move that update element by 2^-8 of the update (RMS 0.2 lr).
#: Prodigy's d is a ratio of sums over every parameter, summed in another order (atomics) than the
#: reference's: 1e-7 relative in d moves updates that grow with d (params reach |100| here).
TOLERANCE = {"muon_adv": 5e-5, "muon": 5e-5, "prodigy_adv": 2e-5}


def _cls(spec: str):
    return getattr(importlib.import_module(f"generated.{spec}"), ALL_SPECS[spec])


@pytest.mark.parametrize("spec", sorted(NO_KERNELS))
def test_spec_without_kernels_is_refused_at_construction(spec: str) -> None:
    """backend='triton' for a spec with no kernels fails in the constructor, naming the reason
    the generated module gives (SinkSGD_adv: its sinkhorn() normalisation)."""
    reason = importlib.import_module(f"generated.{spec}_triton").UNSUPPORTED
    assert reason and "not implemented yet" in reason
    params = [torch.nn.Parameter(torch.randn(4, 3, device=DEVICE))]
    with pytest.raises(ValueError, match="has no triton kernels") as info:
        _cls(spec)(params, backend="triton")
    assert reason in str(info.value)


def _extra(spec: str, setting: dict, dtype: torch.dtype | None = None) -> dict:
    # SGD's first setting has no momentum: give every SGD case some so the buffer path runs.
    setting = {"momentum": 0.9} | setting if spec == "sgd" and "momentum" not in setting else setting
    # a published argument that must equal the parameters' dtype (adams' master_dtype)
    return {**setting, **dtype_argument(spec, dtype)} if dtype is not None else setting


def _run(spec: str, setting: dict, backend: str, dtype: torch.dtype, *, emulate: torch.dtype | None = None,
         shapes=SHAPES, steps: int = STEPS):
    """Train params of ``shapes`` on seeded random gradients; returns params and the optimizer."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in shapes]
    if emulate is not None:
        init = [x.to(emulate).float() for x in init]
    params = [torch.nn.Parameter(x.to(dtype).to(DEVICE if backend == "triton" else "cpu")) for x in init]
    opt = _cls(spec)(params, backend=backend, **_extra(spec, setting, dtype))
    # per-row / per-column states in the parameter's dtype (Adafactor's factors, as torch keeps them)
    factors = {d.name for d in opt._program.state if d.kind in (Kind.ROW, Kind.COL) and d.dtype == "param"}
    for _ in range(steps):
        for p in params:
            g = torch.randn(p.shape, generator=gen)
            p.grad = g.to(p.dtype).to(p.device)
            if emulate is not None:
                p.grad = p.grad.to(emulate).to(p.dtype)
        opt.step()
        if emulate is not None:  # storage rounding, as the triton backend applies it
            with torch.no_grad():
                for p in params:
                    p.copy_(p.to(emulate).to(p.dtype))
                    for k, v in opt.state[p].items():
                        if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point() and (
                                v.dim() == p.dim() or k in factors):
                            v.copy_(v.to(emulate).to(v.dtype))
    return [p.detach().float().cpu() for p in params], opt


#: every setting's flags on every shape; the first setting over more steps: 10 in the default run,
#: 20 under -m extended (CI time: the interpreter); 5 steps reach every branch of the others
#: (Adopt's init step, the factored re-read, warm-ups)
#: (spec, flag) -> the refusal of a setting whose path the triton backend does not compute
TRITON_REFUSES = {("adamuon_adv", "factored_2nd"): "closest-to-square view's factors"}
CASES = [pytest.param(spec, i, s, steps, id=f"{spec}-{i}" + ("-long" if steps == STEPS else ""),
                      marks=[pytest.mark.extended] if steps == STEPS else [])
         for spec in SPECS for i, s in enumerate(settings(spec))
         for steps in ((STEPS // 2, STEPS) if i == 0 else (STEPS // 4,))]


@pytest.mark.parametrize(("spec", "index", "setting", "steps"), CASES)
def test_triton_matches_reference_fp32(spec: str, index: int, setting: dict, steps: int) -> None:
    refusal = next((why for (name, flag), why in TRITON_REFUSES.items() if name == spec and setting.get(flag)), None)
    if refusal is not None:  # the path is refused by name, at construction
        with pytest.raises(RuntimeError, match=refusal):
            _run(spec, setting, "triton", torch.float32, steps=1)
        return
    expected, _ = _run(spec, setting, "reference", torch.float32, steps=steps)
    got, opt = _run(spec, setting, "triton", torch.float32, steps=steps)
    for e, g, shape in zip(expected, got, SHAPES):
        assert g.shape == e.shape
        bound = TOLERANCE.get(spec, 2e-6) * (1 + e.abs())
        assert torch.all((g - e).abs() <= bound), f"{shape}: max diff {(g - e).abs().max():.3e}"
    for st in opt.state.values():  # the step counts live on the device and are written back
        assert "step" not in st or st["step"].item() == steps


#: StableSPAM rescales every element by per-tensor scalars kept in 0-d bf16 states, which the oracle's
#: storage rule (states of the parameter's rank) leaves in fp32: 1.36% of one matrix flipped (interpreter)
#: Adafactor's row and column factors are stored in bf16 (as torch keeps them) and re-read rounded within the
#: step (by the matmean and the outer product), where the oracle keeps this step's values in fp32 and rounds
#: them after it: var_estimate differs by up to an ulp of the factors, and 8% of the (40, 33) matrix flips by
#: one bf16 ulp (interpreter; the 2-ulp bound holds). tests/test_adafactor.py checks triton bf16 against an
#: oracle that rounds the factors where triton does (none flipped on the interpreter).
FLIPS = {"stable_spam": 0.03, "adafactor": 0.15}


#: eps1=None is the parameter dtype's eps (torch.finfo): the fp32 oracle would take float32's, so both
#: runs are given bfloat16's (tests/test_adafactor.py checks that None is that value on triton)
BF16_SETTINGS = {"adafactor": {"eps": (2.0**-7, 1e-3)}}


#: every spec in bf16 over 5 steps in the default run (CI time: the interpreter), over 20 with -m extended
BF16_CASES = [pytest.param(spec, steps, id=f"{spec}-{steps}", marks=[pytest.mark.extended] if steps == STEPS else [])
              for steps in (STEPS // 4, STEPS) for spec in SPECS]


@pytest.mark.parametrize(("spec", "steps"), BF16_CASES)
def test_triton_matches_reference_bf16(spec: str, steps: int) -> None:
    setting = {**settings(spec)[0], **BF16_SETTINGS.get(spec, {})}
    if "stochastic_rounding" in load_spec(ROOT / "specs" / f"{spec}.yaml").model.features:
        setting = {**setting, "stochastic_rounding": False}  # round to nearest: an exact oracle exists
    expected, _ = _run(spec, setting, "reference", torch.float32, emulate=torch.bfloat16, steps=steps)
    got, _ = _run(spec, setting, "triton", torch.bfloat16, steps=steps)
    ulp = 2.0**-7
    for e, g, shape in zip(expected, got, SHAPES):
        if not e.numel():
            continue
        e16 = e.to(torch.bfloat16).float()
        diff = (g - e16).abs()
        # 2 ulps of the result, or of the O(lr) values it may have cancelled down from. Compiled kernels
        # contract multiply-adds; a bf16 rounding of a momentum buffer decided the other way then moves
        # the param by lr * ulp(buffer) (measured on an H100: up to 0.004 on SGD's 0.1-sized values
        # after 20 steps, 0.6% of values; the interpreter: 0 flips), hence the larger floor there
        bound = 2 * ulp * (e16.abs() + (0.02 if DEVICE == "cpu" else 0.25))
        assert torch.all(diff <= bound), f"{shape}: max diff {diff.max():.3e}"
        flips = (diff > 0).float().mean()
        assert flips <= FLIPS.get(spec, 0.01) or diff.numel() < 100, f"{shape}: {flips:.2%} of the values flipped"


@pytest.mark.parametrize("sr", [True, False], ids=["stochastic", "nearest"])
def test_triton_stochastic_rounding_is_unbiased(sr: bool) -> None:
    """Lion moves every element of a bf16 param of 1.0 by lr = ulp(1)/4: rounding to nearest never
    moves it; stochastic rounding moves a quarter of them by one ulp, so the mean moves by lr."""
    ulp = 2.0**-7
    p = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16, device=DEVICE))
    opt = _cls("lion_adv")([p], lr=ulp / 4, backend="triton", stochastic_rounding=sr)
    p.grad = torch.ones_like(p)
    opt.step()
    moved = (p.detach().float() != 1.0).float().mean().item()
    if not sr:
        assert moved == 0.0
        return
    assert set(p.detach().float().unique().tolist()) <= {1.0, 1.0 - ulp / 2}  # below 1.0 the ulp halves
    # P(move) = lr / ulp(just below 1.0) = 0.5; 8192 draws: 5 sigma = 0.028
    assert abs(moved - 0.5) < 0.03, moved
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p.detach(), before), "each step draws new random bits"


def test_paths_away_from_the_defaults_are_rendered_once_into_the_cache() -> None:
    from pathlib import Path

    cache = Path(os.environ["OPTGEN_CACHE_DIR"])
    shipped = importlib.import_module("generated.signsgd_adv_triton").PLAN["paths"]
    kwargs = {"nesterov": True, "nesterov_coef": 0.3, "weight_decay": 0.05, "cautious_wd": True}
    p = torch.nn.Parameter(torch.ones(6, device=DEVICE))
    opt = _cls("signsgd_adv")([p], backend="triton", **kwargs)
    p.grad = torch.ones_like(p)
    opt.step()
    (key,) = [k for k in opt._triton.plan.paths if k not in shipped]
    files = sorted(cache.glob("signsgd_adv_triton_*.py"))
    assert files, "the path's kernels were not written to the cache"
    stamp = [f.stat().st_mtime_ns for f in files]
    q = torch.nn.Parameter(torch.ones(6, device=DEVICE))
    opt2 = _cls("signsgd_adv")([q], backend="triton", **kwargs)
    q.grad = torch.ones_like(q)
    opt2.step()
    assert sorted(cache.glob("signsgd_adv_triton_*.py")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamp  # imported, not rendered again
    assert torch.equal(p.detach(), q.detach())
    assert key in opt2._triton.plan.paths


def test_many_tensors_one_launch_per_stage() -> None:
    """300 tensors (more than torch's multi_tensor_apply puts in one launch) in one launch per stage."""
    shapes = [(i % 7 + 1, 5) for i in range(300)] + [(2000,)]
    expected, _ = _run("adamw", {}, "reference", torch.float32, shapes=shapes, steps=2)
    got, opt = _run("adamw", {}, "triton", torch.float32, shapes=shapes, steps=2)
    for e, g in zip(expected, got):
        assert torch.allclose(g, e, rtol=2e-6, atol=2e-6)
    assert opt._triton.launches == 2 * 2  # prologue + one fused pass per step


def test_launch_count_adams() -> None:
    got, opt = _run("adams", {}, "triton", torch.float32, steps=1)
    # matrices: prologue, zeroing the accumulators, 3 passes and 2 vector stages; the rest: prologue
    # and one pass
    assert opt._triton.launches == 7 + 2


def test_tables_are_cached_and_rebuilt_when_params_change() -> None:
    params = [torch.nn.Parameter(torch.randn(10, device=DEVICE)) for _ in range(3)]
    opt = _cls("adamw")(params, backend="triton")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    (cache,) = opt._triton.caches.values()
    for p in params:
        p.grad = torch.ones_like(p)  # new gradient tensors: only their pointers are re-uploaded
    opt.step()
    assert list(opt._triton.caches.values()) == [cache]
    params[1].grad = None
    opt.step()
    assert list(opt._triton.caches.values()) != [cache]
    assert len(opt._triton.caches) == 1  # the old table shared parameters with the new one: dropped
    assert [opt.state[p]["step"].item() for p in params] == [3, 2, 3]


def test_lr_scheduler_and_tensor_lr() -> None:
    shapes = [(50,), (6, 7)]
    ref = _cls("adamw")([torch.nn.Parameter(torch.ones(s)) for s in shapes], lr=0.1, backend="reference")
    tri = _cls("adamw")([torch.nn.Parameter(torch.ones(s, device=DEVICE)) for s in shapes], lr=0.1, backend="triton")
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ref, tri)]
    for i in range(6):
        for o in (ref, tri):
            for p in o.param_groups[0]["params"]:
                p.grad = torch.full_like(p, (-1.0) ** i)
            o.step()
        for s in scheds:
            s.step()
    for a, b in zip(ref.param_groups[0]["params"], tri.param_groups[0]["params"]):
        assert torch.allclose(a, b.cpu(), rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip_with_reference() -> None:
    got, opt = _run("adam", {"amsgrad": True}, "triton", torch.float32, steps=5)
    sd = opt.state_dict()
    params = [torch.nn.Parameter(g.clone()) for g in got]
    ref = _cls("adam")(params, amsgrad=True, backend="reference")
    ref.load_state_dict(sd)
    assert all(ref.state[p]["step"].item() == 5 for p in params)
    opt.load_state_dict(sd)  # and back: the runner rebuilds its tables
    assert not opt._triton.caches


def test_absent_state_created_then_reused() -> None:
    """SGD's momentum buffer is created by the first step (a branch of its own) and then updated."""
    expected, _ = _run("sgd", {"momentum": 0.9, "dampening": 0.1}, "reference", torch.float32, steps=4)
    got, opt = _run("sgd", {"momentum": 0.9, "dampening": 0.1}, "triton", torch.float32, steps=4)
    for e, g in zip(expected, got):
        assert torch.allclose(g, e, rtol=2e-6, atol=2e-6)
    assert all("momentum_buffer" in st for st in opt.state.values())


def test_cpu_without_interpreter_says_what_to_do() -> None:
    code = (
        "import torch\n"
        "from generated.adamw import AdamW\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "AdamW([p], backend='triton').step()\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "TRITON_INTERPRET=1" in r.stderr and "backend='torch'" in r.stderr


def test_auto_backend_is_torch_on_cpu() -> None:
    opt = _cls("adamw")([torch.nn.Parameter(torch.ones(3))])
    assert opt.backend == ("torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_backend_is_triton_on_cuda_and_scheduler_never_recompiles() -> None:
    p = torch.nn.Parameter(torch.ones(1000, device="cuda"))
    opt = _cls("adamw")([p], lr=0.1)
    assert opt.backend == "triton"
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    mod = importlib.import_module("generated.adamw_triton")
    compiled = sum(len(k.device_caches[0][0]) for k in mod.KERNELS.values() if hasattr(k, "device_caches"))
    for _ in range(5):
        opt.step()
        sched.step()
    assert sum(len(k.device_caches[0][0]) for k in mod.KERNELS.values() if hasattr(k, "device_caches")) == compiled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_capture_of_step() -> None:
    shapes = [(100,), (30, 20)]
    ps = [torch.nn.Parameter(torch.ones(s, device="cuda")) for s in shapes]
    ref = [torch.nn.Parameter(torch.ones(s, device="cuda")) for s in shapes]
    opt = _cls("adamw")(ps, lr=0.01, backend="triton")
    opt_ref = _cls("adamw")(ref, lr=0.01, backend="triton")
    for p in ps + ref:
        p.grad = torch.ones_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            opt.step()
            opt_ref.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        opt.step()
    for _ in range(5):
        g.replay()
        opt_ref.step()
    torch.cuda.synchronize()
    for a, b in zip(ps, ref):
        assert torch.equal(a, b)
    assert opt.state[ps[0]]["step"].item() == 7


def test_compiled_training_step_graph_breaks_into_the_kernels() -> None:
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    if DEVICE == "cuda":
        models = [m.cuda() for m in models]
        x, y = x.cuda(), y.cuda()
    opts = [_cls("adamw")(m.parameters(), lr=0.01, backend="triton") for m in models]

    def train_step(model, opt):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    compiled = torch.compile(train_step, backend="eager" if DEVICE == "cpu" else "inductor")
    for _ in range(4):
        a = train_step(models[0], opts[0])
        b = compiled(models[1], opts[1])
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
