"""The built-in small models ``optgen test`` and ``optgen doc`` train (the same two the test suite
uses, ``tests/models.py``): an MLP and a tiny transformer with every parameter shape optimizers
special-case (batched matrices, a 0-d gate, a column, a matrix opted out of spectral decay)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    @staticmethod
    def batch(dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(32, 8, generator=g, dtype=dtype), torch.randn(32, 4, generator=g, dtype=dtype)


class TinyTransformer(nn.Module):
    """One attention + MLP block with batched (3, d, d) QKV weights, a 0-D gate, an (d, 1) column
    and a matrix opted out of spectral decay."""

    def __init__(self, d: int = 8, vocab: int = 13) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Parameter(torch.randn(3, d, d) / math.sqrt(d))
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.gate = nn.Parameter(torch.tensor(0.5))
        self.col = nn.Parameter(torch.randn(d, 1) * 0.1)
        self.head = nn.Linear(d, vocab)
        self.proj.weight.use_spectral_decay = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        h = self.ln1(x)
        q, k, v = torch.einsum("btd,sde->sbte", h, self.qkv).unbind(0)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.gate * self.proj(att @ v)
        x = x + self.mlp(self.ln2(x))
        return self.head(x) + x @ self.col

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, targets = batch
        return nn.functional.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())

    @staticmethod
    def batch(dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 13, (4, 6), generator=g)
        return tokens, torch.roll(tokens, -1, dims=1)


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "transformer": TinyTransformer}


def make_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name]().to(device=device, dtype=dtype)
    if name == "transformer":
        model.proj.weight.use_spectral_decay = False  # .to() keeps the Parameter objects
    return model


def schedule(k: int) -> float:
    """The LambdaLR factor ``optgen test`` trains under: a short warm-up, then a slow decay."""
    return min(1.0, (k + 1) / 5) / (1.0 + 0.05 * k)


def train(model: nn.Module, make_opt: Callable, steps: int, dtype: torch.dtype = torch.float32,
          scheduled: bool = True) -> tuple[list[torch.Tensor], list[float]]:
    """``steps`` full-batch steps (a LambdaLR stepped after each); the final parameters and losses."""
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if scheduled else None
    device = next(model.parameters()).device
    batch = tuple(t.to(device) for t in type(model).batch(dtype))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return [p.detach().cpu().clone() for p in model.parameters()], losses


def max_diffs(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """Max absolute difference, and max difference relative to the larger magnitude (floor 1)."""
    abs_d = rel_d = 0.0
    for x, y in zip(a, b):
        d = (x.double() - y.double()).abs()
        if d.numel() == 0:
            continue
        abs_d = max(abs_d, d.max().item())
        scale = torch.maximum(x.double().abs(), y.double().abs()).clamp_min(1.0)
        rel_d = max(rel_d, (d / scale).max().item())
    return abs_d, rel_d
