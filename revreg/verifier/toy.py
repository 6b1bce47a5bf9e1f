"""A tiny language-model-shaped network that revreg builds itself, for the demo and examples.

Nothing is downloaded: the weights come from a seeded generator.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyLM(nn.Module):
    """Embedding -> two-layer MLP block with a residual -> LayerNorm -> vocabulary head."""

    def __init__(self, vocab: int = 64, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        x = x + self.down(torch.nn.functional.gelu(self.up(x)))
        return self.head(self.norm(x))


def build(seed: int = 0) -> TinyLM:
    generator = torch.Generator().manual_seed(seed)
    model = TinyLM()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()
