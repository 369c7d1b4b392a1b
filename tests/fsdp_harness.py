"""Spawned gloo ranks that step generated optimizers over DTensor parameters (FSDP2's layout).

Each rank trains a model twice from the same start: once in one process with plain parameters
(the oracle), once with every parameter of one or more dims a ``Shard(0)`` DTensor on a 1-D CPU
mesh (what ``fully_shard`` hands an optimizer), fed the oracle's gradients, so that any difference
is the optimizer's. Rank 0 reports per case the largest parameter difference over the run, the
largest difference in ulps of the parameter's dtype, and the local state bytes against the
single-process state bytes. ``real_fsdp`` cases train a ``fully_shard``-ed model end to end.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def optimizer_class(spec: str) -> type:
    import importlib

    module = importlib.import_module(f"generated.{spec}")
    return next(v for v in vars(module).values()
                if isinstance(v, type) and getattr(v, "_program", None) is not None and v.__module__ == module.__name__)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    from optgen.runtime.sharding import local

    return sum(local(v).numel() * local(v).element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b| in units of the last place of the larger magnitude (0 when equal)."""
    if a.numel() == 0:
        return 0.0
    d = (a.double() - b.double()).abs()
    scale = torch.maximum(a.double().abs(), b.double().abs()).clamp_min(1e-3)  # ulps of values >= 1e-3
    eps = torch.finfo(a.dtype).eps
    spacing = torch.exp2(torch.floor(torch.log2(scale))) * eps
    return (d / spacing).max().item()


def _sharded(model: torch.nn.Module, mesh: Any) -> list[torch.Tensor]:
    from torch.distributed.tensor import Shard, distribute_tensor

    out = []
    for p in model.parameters():
        if p.dim() == 0:  # fully_shard refuses 0-d parameters: a plain (replicated) parameter
            q = torch.nn.Parameter(p.detach().clone())
        else:
            q = torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))
        for attr in ("use_spectral_decay",):
            if hasattr(p, attr):
                setattr(q, attr, getattr(p, attr))
        out.append(q)
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    from optgen.runtime.sharding import is_dtensor

    return t.full_tensor() if is_dtensor(t) else t


def run_case(spec: str, setting: dict, kind: str, steps: int, backend: str, mesh: Any,
             dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    from tests.models import make_model

    cls = optimizer_class(spec)
    model = make_model(kind, dtype)
    params = list(model.parameters())
    sharded = _sharded(model, mesh)
    # the one-process oracle: the same backend, except the reference backend's (torch's: exact there)
    opt1 = cls(params, **setting, backend="triton" if backend == "triton" else "torch")
    opt2 = cls(sharded, **setting, backend=backend)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1.0 / (1 + 0.1 * i)) for o in (opt1, opt2)]
    worst, worst_ulps = 0.0, 0.0
    for i in range(steps):
        opt1.zero_grad()
        model.loss(model.batch(dtype, seed=i)).backward()
        for p, q in zip(params, sharded):
            q.grad = None if p.grad is None else _grad_like(p.grad, q)
        opt1.step()
        opt2.step()
        for s in scheds:
            s.step()
        for p, q in zip(params, sharded):
            full = _full(q.detach())
            worst = max(worst, (full - p.detach()).abs().max().item() if p.numel() else 0.0)
            worst_ulps = max(worst_ulps, ulps(full, p.detach()))
    return {"max_diff": worst, "max_ulps": worst_ulps, "state_bytes": state_bytes(opt2),
            "single_state_bytes": state_bytes(opt1), "opt": opt2, "params": sharded}


def _grad_like(g: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    from optgen.runtime.sharding import is_dtensor

    if not is_dtensor(q):
        return g.clone()
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(g.clone(), q.device_mesh, q.placements)


def real_fsdp(spec: str, setting: dict, steps: int, mesh: Any, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """An MLP under ``fully_shard``, every rank on the same batch (FSDP2's averaged gradient is then
    the one-process gradient exactly), against one process."""
    from torch.distributed.fsdp import fully_shard

    from tests.models import make_model

    cls = optimizer_class(spec)
    ref = make_model("mlp", dtype)
    model = copy.deepcopy(ref)
    for layer in model.net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt1 = cls(ref.parameters(), **setting, backend="torch")
    opt2 = cls(model.parameters(), **setting, backend="torch")
    for i in range(steps):
        for m, o in ((ref, opt1), (model, opt2)):
            o.zero_grad()
            m.loss(m.batch(dtype, seed=i)).backward()
            o.step()
    worst = max((_full(q.detach()) - p.detach()).abs().max().item() for p, q in zip(ref.parameters(), model.parameters()))
    return {"max_diff": worst, "state_bytes": state_bytes(opt2), "single_state_bytes": state_bytes(opt1)}


def _rank(rank: int, world: int, port: int, cases: list[tuple[str, tuple]], out: str) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from optgen.runtime import sharding

    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, Any] = {}
    try:
        for key, (fn, args) in cases:
            sharding.SENT["bytes"] = 0
            try:
                r = (run_case if fn == "case" else globals()[fn])(*args, mesh=mesh)
                r.pop("opt", None), r.pop("params", None)
                r["sent_bytes"] = sharding.SENT["bytes"]
            except Exception:  # noqa: BLE001 - reported to the test, which fails with it
                r = {"error": traceback.format_exc()}
            results[key] = r
    finally:
        torch.save(results, f"{out}.{rank}")
        dist.destroy_process_group()


def spawn(world: int, cases: list[tuple[str, tuple]], out: str, timeout: float = 600) -> list[dict[str, Any]]:
    """Run ``cases`` (``(key, (fn, args))``) on ``world`` spawned gloo ranks; results per rank."""
    ctx = mp.start_processes(_rank, args=(world, free_port(), cases, out), nprocs=world, join=False,
                             start_method="spawn")
    join_bounded(ctx, timeout, f"{world} gloo ranks running {len(cases)} cases")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def join_bounded(ctx: Any, timeout: float, what: str) -> None:
    """Wait for spawned processes; kill them and fail after ``timeout`` seconds (a hang fails)."""
    import time

    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{what} did not finish within {timeout} s")


def ratio(r: dict[str, Any]) -> float:
    return r["state_bytes"] / max(r["single_state_bytes"], 1)


__all__ = ["spawn", "run_case", "real_fsdp", "ulps", "ratio", "math"]


# -- torch.distributed.checkpoint: save on N ranks, load on M -----------------------------------
def _fsdp_mlp(mesh: Any, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    from tests.models import make_model

    model = make_model("mlp", dtype, seed=seed)
    for layer in model.net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, start: int, steps: int, dtype: torch.dtype) -> None:
    for i in range(start, start + steps):
        opt.zero_grad()
        model.loss(model.batch(dtype, seed=i)).backward()
        opt.step()


def dcp_save(spec: str, setting: dict, steps: int, path: str, mesh: Any, dtype: torch.dtype = torch.float32) -> dict:
    """Train an FSDP2 MLP ``steps`` steps and save model and optimizer with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = _fsdp_mlp(mesh, dtype)
    opt = optimizer_class(spec)(model.parameters(), **setting, backend="torch")
    _train_steps(model, opt, 0, steps, dtype)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    return {"saved": True}


def dcp_load(spec: str, setting: dict, steps: int, path: str, mesh: Any, dtype: torch.dtype = torch.float32) -> dict:
    """Load :func:`dcp_save`'s checkpoint on this world (another init), train ``steps`` more; the
    largest difference from one process training ``2 * steps`` steps uninterrupted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from tests.models import make_model

    cls = optimizer_class(spec)
    ref = make_model("mlp", dtype)
    ref_opt = cls(ref.parameters(), **setting, backend="torch")
    _train_steps(ref, ref_opt, 0, 2 * steps, dtype)
    model = _fsdp_mlp(mesh, dtype, seed=123)
    opt = cls(model.parameters(), **setting, backend="torch")
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    _train_steps(model, opt, steps, steps, dtype)
    worst = max((_full(q.detach()) - p.detach()).abs().max().item() for p, q in zip(ref.parameters(), model.parameters()))
    return {"max_diff": worst}
