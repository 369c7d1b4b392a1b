"""One published class, one generated class (issue 15, item 3): adv_optm 2.2.3's Adopt_adv and
Prodigy_adv take ``Simplified_AdEMAMix=True`` in the same generated class as their other flags.

adv_optm turns ``use_AdEMAMix``, ``grams_moment``, ``cautious_mask`` and ``use_atan2`` off under the
flag (Adopt_adv turns atan2 off without a word); the generated classes refuse each pair at
construction and in ``add_param_group`` with a ValueError naming both flags. The maths of both modes
is compared with adv_optm in tests/test_equivalence.py (the specs' ``matches.settings``).
"""

from __future__ import annotations

import pytest
import torch

from generated.adopt_adv_2_2_3 import Adopt_adv
from generated.prodigy_adv_2_2_3 import Prodigy_adv

CLASSES = [Adopt_adv, Prodigy_adv]
EXCLUDED = ["use_AdEMAMix", "grams_moment", "cautious_mask", "use_atan2"]


def _params():
    return [torch.nn.Parameter(torch.randn(4, 3))]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__module__)
@pytest.mark.parametrize("other", EXCLUDED)
def test_excluded_flag_is_an_error(cls, other: str) -> None:
    with pytest.raises(ValueError, match=f"Simplified_AdEMAMix=True and {other}=True cannot be combined"):
        cls(_params(), Simplified_AdEMAMix=True, **{other: True})
    cls(_params(), Simplified_AdEMAMix=False, **{other: True})  # each flag alone is fine
    cls(_params(), Simplified_AdEMAMix=True, **{other: False})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__module__)
def test_excluded_flag_in_a_group(cls) -> None:
    opt = cls(_params(), Simplified_AdEMAMix=True)
    with pytest.raises(ValueError, match="grams_moment=True cannot be combined"):
        opt.add_param_group({"params": _params(), "grams_moment": True})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__module__)
def test_beta1_zero(cls) -> None:
    with pytest.raises(ValueError, match="Simplified_AdEMAMix"):
        cls(_params(), Simplified_AdEMAMix=True, betas=(0.0, 0.999))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__module__)
def test_both_modes_step(cls) -> None:
    """The two modes of one class take different steps from the same start."""
    out = []
    for flag in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(8, 5))
        opt = cls([p], Simplified_AdEMAMix=flag, lr=1e-3 if cls is Adopt_adv else 0.3, backend="torch")
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
        out.append(p.detach().clone())
    assert torch.isfinite(out[1]).all() and not torch.equal(out[0], out[1])
