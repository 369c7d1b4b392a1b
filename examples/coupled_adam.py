"""Coupled Adam as the paper uses it: the token embedding in its own group, coupled; AdamW for the rest.

Stollenwerk & Stollenwerk ("Better Embeddings with Coupled Adam", ACL 2025) give the token
embedding ``wte`` (weight-tied with the LM head, as here) a CoupledAdam of its own and every other
parameter torch.optim.AdamW, with betas (0.9, 0.95) and gradient clipping at 1.0. One generated
``CoupledAdam`` does the same with two groups: the embedding's (coupled: its second moment averaged
over the vocabulary per hidden coordinate) and the rest with ``coupled=False`` (plain AdamW,
the same maths as torch's). ``--check`` also runs the paper's two optimizers and asserts that the
parameters are bit-identical.

Run ``optgen build specs/coupled_adam.yaml`` first. The data is made here (no downloads): random
tokens drawn from a skewed (Zipf-like) distribution, the target the sequence shifted by one, so
frequent and rare tokens get very different gradient statistics. Printed: the loss and the norm of
the mean embedding vector relative to the mean vector norm (the drift away from the origin that
Adam causes and coupling removes).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, seq: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # weight tying, as nanoGPT

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.pos[: tokens.shape[1]]
        x = x + self.mlp(self.ln(x))
        return self.head(self.ln_f(x))


def groups(model: TinyLM, weight_decay: float) -> list[dict]:
    """The embedding in its own coupled group (no decay, the paper's default without embdecay); the
    rest uncoupled."""
    emb = model.wte.weight
    rest = [p for p in model.parameters() if p is not emb]
    return [{"params": [emb], "weight_decay": 0.0}, {"params": rest, "coupled": False, "weight_decay": weight_decay}]


def anisotropy(emb: torch.Tensor) -> float:
    """||mean embedding|| / mean ||embedding||: 0 for a centred embedding, 1 if all vectors agree."""
    return (emb.mean(0).norm() / emb.norm(dim=1).mean()).item()


def run(args, make_opts, vocab: int, seq: int) -> tuple[TinyLM, list[float]]:
    torch.manual_seed(0)
    model = TinyLM(vocab, args.d, seq)
    opts = make_opts(model)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float) ** 1.1
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(args.steps):
        tokens = torch.multinomial(probs, 32 * (seq + 1), replacement=True, generator=gen).view(32, seq + 1)
        for o in opts:
            o.zero_grad()
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
        losses.append(loss.item())
    return model, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--avg-scale", type=float, default=1.0)
    ap.add_argument("--backend", default="torch", choices=["auto", "torch", "reference", "triton"])
    ap.add_argument("--check", action="store_true", help="also run the paper's two optimizers and compare")
    args = ap.parse_args()

    from generated import CoupledAdam

    vocab, seq, wd = 256, 16, 0.1
    hp = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    coupled, losses = run(args, lambda m: [CoupledAdam(groups(m, wd), avg_scale=args.avg_scale, backend=args.backend,
                                                       **hp)], vocab, seq)
    adamw, adamw_losses = run(args, lambda m: [torch.optim.AdamW(groups(m, wd), **hp)], vocab, seq)
    print(f"{args.steps} steps, vocab {vocab}, d {args.d}")
    print(f"  CoupledAdam (embedding coupled): loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"anisotropy {anisotropy(coupled.wte.weight.detach()):.3f}")
    print(f"  AdamW:                           loss {adamw_losses[0]:.3f} -> {adamw_losses[-1]:.3f}, "
          f"anisotropy {anisotropy(adamw.wte.weight.detach()):.3f}")
    if args.check:
        from tests.test_coupled import CoupledAdamRef  # the reference written from math/ (not a package)

        def paper(m: TinyLM):
            g = groups(m, wd)
            return [CoupledAdamRef(g[0]["params"], avg_scale=args.avg_scale, weight_decay=0.0, **hp),
                    torch.optim.AdamW(g[1]["params"], weight_decay=wd, **hp)]

        two, two_losses = run(args, paper, vocab, seq)
        diff = max((a - b).abs().max().item() for a, b in zip(coupled.parameters(), two.parameters()))
        print(f"  the paper's two optimizers: max parameter difference {diff:.3e}")
        assert diff == 0.0 and two_losses == losses


if __name__ == "__main__":
    main()
