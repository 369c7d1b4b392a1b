"""Runtime defects found by trying (issue 13, item 7): a tensor lr for Muon_adv / AdaMuon_adv as
adv_optm accepts it (within float32 rounding of adv_optm's tensor maths); Adams_ZeRO's ``master_dtype`` honoured or refused, never ignored; and
Adams_ZeRO with a one-rank ``process_group`` inside a larger world, as adams-torch runs it."""

from __future__ import annotations

import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from generated.adams_zero import Adams_ZeRO
from generated.adamuon_adv import AdaMuon_adv
from generated.muon_adv import Muon_adv
from tests.models import make_model


def _train(model, opt, steps: int = 10) -> list[torch.Tensor]:
    batch = type(model).batch(torch.float32)
    for _ in range(steps):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls", [Muon_adv, AdaMuon_adv], ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_tensor_lr_for_muon(cls, backend: str) -> None:
    import adv_optm

    published = getattr(adv_optm, cls.__name__)
    # the MLP: the transformer's (8, 1) column is orthogonalised from a rank-1 matrix, so 1e-7 in
    # lr (a float32 tensor lr against a float) already moves it by 6e-2 within adv_optm itself
    a, b = make_model("mlp", torch.float32), make_model("mlp", torch.float32)
    ours = _train(a, cls(a.parameters(), lr=torch.tensor(0.02), backend=backend))
    theirs = _train(b, published(b.parameters(), lr=torch.tensor(0.02)))
    # adv_optm keeps a tensor lr's products as float32 tensors; optgen reads lr as a number and
    # computes its host scalars in float64 (as for a float lr, where both are bit-identical): the
    # scaled updates differ by float32 rounding
    for x, y in zip(ours, theirs):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-6), (x - y).abs().max()


def test_master_dtype_is_refused_when_it_differs() -> None:
    p = torch.nn.Parameter(torch.randn(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"master_dtype=torch.float64 differs from the dtype of parameter 0 "
                                             r"\(torch.float32\): a master copy in another dtype is not implemented"):
            Adams_ZeRO([p], master_dtype=torch.float64)
        opt = Adams_ZeRO([p], master_dtype=torch.float32)
        with pytest.raises(ValueError, match="differs from the dtype of parameter 0"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank_group(rank: int, world: int, port: int, results) -> None:
    import adams

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # every rank its own one-rank group: adams-torch steps in single-process mode within it
        groups = [dist.new_group([r]) for r in range(world)]
        mine = groups[rank]
        out = []
        for cls in (Adams_ZeRO, adams.Adams_ZeRO):
            model = make_model("mlp", torch.float32, seed=rank)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = cls(model.parameters(), process_group=mine, lr=0.01)
            out.append(_train(model, opt, 5))
        results[rank] = max((x - y).abs().max().item() for x, y in zip(*out))
        # the default group (2 ranks): ZeRO sharding, as adams-torch (tests/test_adams_zero_ranks.py)
        assert Adams_ZeRO(make_model("mlp", torch.float32).parameters())._zero.world == 2
    finally:
        dist.destroy_process_group()


def test_one_rank_process_group_in_a_larger_world() -> None:
    world = 2
    results = mp.Manager().dict()
    mp.start_processes(_one_rank_group, args=(world, _free_port(), results), nprocs=world, join=True,
                       start_method="spawn")
    assert dict(results) == {0: 0.0, 1: 0.0}
