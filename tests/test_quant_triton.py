"""The block codecs of optgen.quant in the triton kernels against the reference backend.

Under Triton's interpreter the fused passes decode and encode bitsandbytes' and torchao's block
formats in registers (per-block absmax a row reduction of a ``(rows, block)`` tile, code-book
gathers, 4-bit codes packed two per byte). The oracle is the reference backend, which runs the
codecs' torch functions (themselves bit-identical to the pinned packages: tests/test_quant.py,
tests/test_quant_published.py).

Why the inputs are dyadic: torch's CPU kernels for ``add(alpha=)``, ``addcmul`` and ``lerp``
fuse a multiply-add (one rounding) where the interpreter rounds the product first, so with
arbitrary betas the float32 moments of the two backends may differ in the last bit, and a scale
(a block's absmax) with them. With gradients multiples of 1/8 in [-1, 1] and betas (0.5, 0.75)
every product by ``1 - beta`` (and ``g * g``) is exact, so each moment update rounds once in
both backends: the states then must be equal, and the stored codes and scales are compared bit
for bit at every step. The parameters' update (a division and an ``addcdiv``) still rounds the
two ways: they are compared in float32 ulps.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

#: 0-d, empty, small (float32 states), a partial last bnb block (4097, 4500), batched whole blocks (3-D, 4-D)
SHAPES = [(), (0,), (5,), (4097,), (3, 1500), (2, 3, 1024), (2, 2, 128, 8)]
STEPS = 3
LR = 1e-2
#: float32 ulps (of the parameter, of an lr-sized update) the parameters may drift per step:
#: fused against unfused roundings of the update
ULPS_PER_STEP = 2
EPS32 = 2.0**-23

CASES = [
    ("adamw8bit_bnb", "8bit"), ("adam8bit_bnb", "8bit"), ("adamw8bit_bnb", "8bit_cuda"),
    ("adam8bit_bnb", "8bit_cuda"), ("adamw8bit_ao", None), ("adam8bit_ao", None), ("adamw4bit_ao", None),
    ("adam4bit_ao", None), ("adamwfp8_ao", None), ("adamfp8_ao", None),
]
DEFAULT = ("adamw8bit_bnb", "8bit")


def _cls(module: str):
    mod = importlib.import_module(f"generated.{module}")
    return next(v for v in vars(mod).values() if isinstance(v, type) and v.__module__ == mod.__name__
                and issubclass(v, torch.optim.Optimizer))


def _run(module: str, precision: str | None, backend: str):
    g = torch.Generator().manual_seed(11)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    kw = {"state_precision": precision} if precision else {}
    # torchao's Adam forms add the decay to the gradient (no longer dyadic): decay only where it is
    # decoupled (AdamW, and bnb's Adam8bit)
    wd = 0.0 if module.startswith("adam") and module.endswith("_ao") and not module.startswith("adamw") else 0.1
    opt = _cls(module)(ps, backend=backend, lr=LR, betas=(0.5, 0.75), weight_decay=wd, **kw)
    history = []
    for _ in range(STEPS):
        for p in ps:
            p.grad = torch.randint(-8, 9, p.shape, generator=g).float() * 0.125
        opt.step()
        history.append(([p.detach().clone() for p in ps],
                        [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in ps]))
    return history


def _compare(module: str, precision: str | None) -> dict:
    ref, tri = _run(module, precision, "reference"), _run(module, precision, "triton")
    coded, worst = 0, 0.0
    for step, ((p_ref, s_ref), (p_tri, s_tri)) in enumerate(zip(ref, tri), 1):
        for i, (a, b) in enumerate(zip(s_ref, s_tri)):
            assert a.keys() == b.keys(), (SHAPES[i], a.keys(), b.keys())
            for k, v in a.items():
                if k == "step":
                    continue
                assert b[k].dtype == v.dtype and b[k].shape == v.shape, (step, SHAPES[i], k)
                assert torch.equal(b[k], v), f"step {step}, shape {SHAPES[i]}: '{k}' differs"
                coded += v.dtype == torch.uint8 and v.numel() > 0 and bool(v.any())
        for i, (a, b) in enumerate(zip(p_ref, p_tri)):
            if a.numel():
                worst = max(worst, (a - b).abs().max().item())
            torch.testing.assert_close(b, a, rtol=ULPS_PER_STEP * step * EPS32, atol=ULPS_PER_STEP * step * EPS32 * LR,
                                       msg=lambda m, i=i, step=step: f"step {step}, shape {SHAPES[i]}: {m}")
    assert coded, "no state took the 8-/4-bit path: the comparison tested nothing quantised"
    if "4bit" in module:  # torchao's layout: two codes per byte, flat
        for p, st in zip(SHAPES, tri[-1][1]):
            n = torch.Size(p).numel()
            if st["exp_avg"].dtype == torch.uint8:
                assert st["exp_avg"].shape == st["exp_avg_sq"].shape == (n // 2,)
    return {"param_max_abs": worst}


@pytest.mark.parametrize(("module", "precision"), [pytest.param(*c, marks=[] if c == DEFAULT else
                                                                [pytest.mark.extended]) for c in CASES],
                         ids=[f"{m}-{p}" if p else m for m, p in CASES])
def test_triton_block_codecs_store_the_reference_codes(module: str, precision: str | None) -> None:
    _compare(module, precision)
