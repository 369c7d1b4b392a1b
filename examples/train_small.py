"""The main job: train a small transformer on a synthetic copy task with the generated Adams.

Run `optgen build specs/adams.yaml` first (the README's first command does both). The data is
made here (no downloads): sequences of random tokens whose target is the sequence shifted by one
position, which a one-block transformer learns in a few hundred steps on a CPU.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, seq: int) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.ln1 = nn.LayerNorm(d)
        # Q, K and V as one batched (3, d, d) parameter: Adams decays each matrix separately.
        self.qkv = nn.Parameter(torch.randn(3, d, d) / math.sqrt(d))
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, vocab)
        for p in (self.emb.weight, self.head.weight):
            p.use_spectral_decay = False  # as the Adams README advises for embeddings and heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        x = self.emb(tokens) + self.pos[:t]
        q, k, v = torch.einsum("btd,sde->sbte", self.ln1(x), self.qkv).unbind(0)
        split = lambda z: z.view(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        att = nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        x = x + self.mlp(self.ln2(x))
        return self.head(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "reference"])
    args = ap.parse_args()

    from generated import Adams

    torch.manual_seed(0)
    vocab, seq, batch = 32, 16, 32
    model = Block(vocab, d=64, heads=4, seq=seq)
    opt = Adams(model.parameters(), lr=args.lr, weight_decay=0.1, backend=args.backend)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training a {n_params:,}-parameter transformer block with optgen's Adams ({opt.backend} backend)")
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    first = None
    for step in range(1, args.steps + 1):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        logits = model(tokens[:, :-1])
        # target: the previous input token (copy with a one-step delay)
        target = torch.cat([tokens[:, :1], tokens[:, :-2]], dim=1)
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        first = first if first is not None else loss.item()
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}", flush=True)
    print(f"done in {time.perf_counter() - start:.1f} s: loss {first:.3f} -> {loss.item():.3f}")
    if not loss.item() < 0.5 * first:
        raise SystemExit("the loss did not fall by half: something is wrong")


if __name__ == "__main__":
    main()
