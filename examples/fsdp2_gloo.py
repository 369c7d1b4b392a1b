"""FSDP2 with a generated optimizer (and Adams_ZeRO across ranks), on CPU with gloo.

    torchrun --nproc_per_node 2 examples/fsdp2_gloo.py [--optimizer Muon_adv] [--steps 30] [--check]
    torchrun --nproc_per_node 2 examples/fsdp2_gloo.py --optimizer Adams_ZeRO [--check]
    TRITON_INTERPRET=1 torchrun --nproc_per_node 2 examples/fsdp2_gloo.py --opt-backend triton --steps 3 --check

FSDP2 (``fully_shard``) hands the optimizer DTensor parameters sharded on dim 0; the generated
optimizer steps each rank's rows with its own fused code and keeps optimizer state for those rows
only, reducing across ranks only what spans them (optgen.runtime.sharding; with ``--opt-backend
triton``, the default on CUDA, the fused Triton kernels on the local rows:
optgen.runtime.sharded_triton). ``Adams_ZeRO`` is not
used with FSDP: it shards the optimizer itself as adams-torch does (plain parameters, the same on
every rank; its step reduce-scatters the gradients and all-gathers the parameters), so its
gradients must not also be averaged by DDP. Every rank trains on the same batches here, so that
``--check`` can compare with one process training alone; each rank prints its optimizer state
bytes and the bytes the optimizer's collectives sent per step. On GPUs use ``--backend nccl``.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist
from torch import nn

import generated
from optgen.runtime import sharding


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(32, 64), nn.LayerNorm(64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(sharding.local(v).numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", default="AdamW", help="a class of `generated`")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--opt-backend", default="auto", help="the optimizer's backend (auto: triton on CUDA)")
    ap.add_argument("--check", action="store_true", help="also train in this process alone and compare")
    args = ap.parse_args()

    dist.init_process_group(args.backend)  # torchrun's env:// (127.0.0.1 by default)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}") if args.backend == "nccl" else torch.device("cpu")
    cls = getattr(generated, args.optimizer)
    zero = args.optimizer == "Adams_ZeRO"
    model = make_model().to(device)
    if not zero:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, (nn.Linear, nn.Embedding)):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    params = [p for p in model.parameters() if not zero or p.numel() % world == 0]
    opt = cls(params, lr=args.lr, backend=args.opt_backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    if args.check:  # one process alone, from the same start (Adams_ZeRO: alone in a one-rank group)
        ref = make_model().to(device)
        alone = dist.new_group([rank]) if zero else None
        ref_params = [p for p in ref.parameters() if not zero or p.numel() % world == 0]
        ref_opt = cls(ref_params, lr=args.lr, backend=args.opt_backend, **({"process_group": alone} if zero else {}))
        ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    g = torch.Generator().manual_seed(1)  # the same batches on every rank
    sharding.SENT["bytes"] = 0
    for step in range(args.steps):
        tokens = torch.randint(0, 32, (16, 12), generator=g).to(device)
        runs = [(model, opt, sched)] + ([(ref, ref_opt, ref_sched)] if args.check else [])
        for m, o, s in runs:
            o.zero_grad()
            loss = nn.functional.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten())
            if zero and m is model:
                loss = loss / world  # Adams_ZeRO sums the gradients of the ranks (adams-torch)
            loss.backward()
            o.step()
            s.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}")
    sent = sharding.SENT["bytes"] / args.steps
    print(f"rank {rank}: {args.optimizer}: optimizer state {state_bytes(opt)} bytes, "
          f"optimizer collectives sent {sent:.0f} bytes per step")
    if args.check:
        full = [p.full_tensor() if sharding.is_dtensor(p) else p for p in model.parameters()]
        diff = max((a - b).abs().max().item() for a, b in zip(full, ref.parameters()))
        print(f"rank {rank}: max |sharded - one process| = {diff:.3g} (one process: {state_bytes(ref_opt)} state bytes)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
