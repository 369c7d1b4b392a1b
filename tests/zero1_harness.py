"""ZeRO-1 checks shared by tests/test_zero1.py and the measurements in its docstring.

Each spawned rank trains the same model twice under DDP (gloo, CPU): once with the unsharded
generated optimizer, once with ``torch.distributed.optim.ZeroRedundancyOptimizer`` wrapping the
generated class, both under a LambdaLR that moves lr every step. It reports, per case: the largest
difference between the two runs' parameters, whether every rank holds the same parameters, the
optimizer state bytes of this rank's local (sharded) optimizer and of the unsharded one, and the
checkpoint round trips (ZeRO's consolidated state dict against the unsharded optimizer's, loaded
into an unsharded optimizer in one process, and loaded back into ZeRO on every rank).
"""

from __future__ import annotations

import copy
import importlib
import math
import socket
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from optgen.spec.loader import load_spec
from tests.models import make_model
from tests.published import SPECS, dtype_argument, same_value


def lr_lambda(step: int) -> float:
    """Moves lr at every step (LambdaLR), never to zero."""
    return 0.6 + 0.4 * math.cos(step)


class _Loss(nn.Module):
    """The test models compute their loss in ``loss``; DDP needs it as ``forward``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def spec_class(spec: str):
    return getattr(importlib.import_module(f"generated.{spec}"), load_spec(SPECS / f"{spec}.yaml").model.class_)


def spec_settings(spec: str) -> list[dict[str, Any]]:
    m = load_spec(SPECS / f"{spec}.yaml").model.matches
    return list(m.settings) if m is not None else [{}]


def kwargs_of(spec: str, setting: dict[str, Any]) -> dict[str, Any]:
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in setting.items()}
    kw.update(dtype_argument(spec, torch.float32))
    return kw


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in (st or {}).values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x.double() - y.double()).abs().max().item() for x, y in zip(a, b) if x.numel()), default=0.0)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two state dicts hold the same per-parameter entries, tensors bit for bit."""
    return sorted(a["state"]) == sorted(b["state"]) and all(same_value(a["state"][k], b["state"][k]) for k in a["state"])


def _step(ddp: nn.Module, opt, sched, batch) -> None:
    opt.zero_grad()
    ddp(batch).backward()
    opt.step()
    sched.step()


def run_case(rank: int, world: int, spec: str, setting: dict[str, Any], model_name: str, steps: int,
             checkpoint: bool, backend: str = "torch") -> dict[str, Any]:
    cls = spec_class(spec)
    kw = kwargs_of(spec, setting)
    kw["backend"] = backend
    batch = type(make_model(model_name, torch.float32)).batch(torch.float32, seed=1 + rank)  # each rank its own data
    out: dict[str, Any] = {}

    ref_model = make_model(model_name, torch.float32)
    ref_ddp = DDP(_Loss(ref_model))
    ref = cls(ref_model.parameters(), **kw)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lr_lambda)

    z_model = make_model(model_name, torch.float32)
    z_ddp = DDP(_Loss(z_model))
    zero = ZeroRedundancyOptimizer(z_model.parameters(), optimizer_class=cls, **kw)
    z_sched = torch.optim.lr_scheduler.LambdaLR(zero, lr_lambda)

    for _ in range(steps):
        _step(ref_ddp, ref, ref_sched, batch)
        _step(z_ddp, zero, z_sched, batch)
    ours, theirs = _params(z_model), _params(ref_model)
    out["max_diff"] = _max_diff(ours, theirs)
    flat = torch.cat([p.reshape(-1) for p in ours])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    out["ranks_equal"] = all(torch.equal(g, gathered[0]) for g in gathered)
    out["local_state_bytes"] = state_bytes(zero.optim)
    out["full_state_bytes"] = state_bytes(ref)
    out["local_params"] = sum(len(g["params"]) for g in zero.optim.param_groups)
    if not checkpoint:
        return out

    # consolidate on rank 0: the same state dict, bit for bit, as the unsharded optimizer's
    zero.consolidate_state_dict(to=0)
    more = max(steps // 2, 3)
    if rank == 0:
        try:  # a failure here must still reach the broadcast below, or the other ranks wait there
            sd = _rank0_checks(out, zero, ref, ref_sched, cls, kw, model_name, ours, batch, more)
        except Exception as e:  # noqa: BLE001 - every rank fails the case at the load below instead
            out["rank0_error"] = traceback.format_exc()
            sd = {"rank0_error": f"{type(e).__name__}: {e}"}
    else:
        sd = None
    # ZeRO's load_state_dict on every rank: a fresh ZeRO optimizer loaded from rank 0's state dict
    # continues as a fresh unsharded one loaded from its own state dict. Both under new DDP
    # wrappers: a DDP's first step buckets the gradients differently from its later ones, which
    # changes the order of gloo's sums on 4 ranks.
    box = [sd]
    dist.broadcast_object_list(box, src=0)
    sd = box[0]
    if "rank0_error" in sd:
        raise RuntimeError(f"rank 0's state-dict checks failed: {sd['rank0_error']}")
    runs = []
    for sharded, saved in ((True, sd), (False, ref.state_dict())):
        m = make_model(model_name, torch.float32)
        with torch.no_grad():
            for p, q in zip(m.parameters(), ours):
                p.copy_(q)
        ddp = DDP(_Loss(m))
        o = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=cls, **kw) if sharded else cls(m.parameters(), **kw)
        s = torch.optim.lr_scheduler.LambdaLR(o, lr_lambda)
        o.load_state_dict(copy.deepcopy(saved))  # ZeRO keeps (and mutates) the owned entries
        s.load_state_dict(ref_sched.state_dict())
        runs.append((m, ddp, o, s))
    for _ in range(more):
        for _, ddp, o, s in runs:
            _step(ddp, o, s, batch)
    out["zero_load_continue_diff"] = _max_diff(_params(runs[0][0]), _params(runs[1][0]))
    return out


def _rank0_checks(out: dict[str, Any], zero, ref, ref_sched, cls, kw: dict[str, Any], model_name: str,
                  ours: list[torch.Tensor], batch, more: int) -> dict[str, Any]:
    """Rank 0's checks of the consolidated state dict; returns it (for every rank's load)."""
    sd = copy.deepcopy(zero.state_dict())
    out["state_dict_equal"] = _same_state(sd, ref.state_dict())
    # loaded into an unsharded optimizer in one process, it continues as the unsharded one does
    runs = []
    for saved in (copy.deepcopy(sd), copy.deepcopy(ref.state_dict())):  # loads share tensors
        m = make_model(model_name, torch.float32)
        with torch.no_grad():
            for p, q in zip(m.parameters(), ours):
                p.copy_(q)
        o = cls(m.parameters(), **kw)
        s = torch.optim.lr_scheduler.LambdaLR(o, lr_lambda)  # resuming: scheduler, then both loads
        o.load_state_dict(saved)
        s.load_state_dict(ref_sched.state_dict())
        for _ in range(more):
            _step(_Loss(m), o, s, batch)
        runs.append(_params(m))
    out["one_process_continue_diff"] = _max_diff(*runs)
    return sd


def worker(rank: int, world: int, port: int, cases: list[tuple], results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for key, args in cases:
            t = time.perf_counter()
            try:
                r = run_case(rank, world, *args)
            except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the test
                r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            r["seconds"] = time.perf_counter() - t
            results[(rank, key)] = r
            dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, cases: list[tuple], timeout: float) -> dict:
    """Run ``cases`` (``(key, run_case args)``) on ``world`` spawned gloo ranks; results by ``(rank, key)``.

    Raises TimeoutError (after killing the ranks) if they have not finished within ``timeout`` seconds.
    """
    manager = mp.Manager()
    results = manager.dict()
    ctx = mp.start_processes(worker, args=(world, free_port(), cases, results), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} gloo ranks did not finish {len(cases)} cases within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = dict(results)
    manager.shutdown()
    return out
