"""What every amortized generator offers, and the field adapter the (unchanged) renderer draws."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Generator(nn.Module):
    """text embeddings (+ noise) -> per-prompt codes; (points, codes, i) -> prompt i's field."""

    noise_dim: int = 0  # 0: deterministic in the text (Hyper-iNGP)

    def codes(self, text: torch.Tensor, noise: torch.Tensor | None = None) -> Any:
        raise NotImplementedError

    def query(self, points: torch.Tensor, codes: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """points [N, 3] in world coordinates -> (density [N] >= 0, rgb [N, 3] in [0, 1])."""
        raise NotImplementedError


class ConditionedField(nn.Module):
    """The renderer's `field` (points -> density, rgb) for whichever prompt is selected.

    `VolumeRenderer` draws one field per call; the amortized model selects prompt i's code, renders
    its view, and moves on, so the renderer is reused exactly as the per-prompt trainer uses it.
    """

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator
        self._codes: Any = None
        self._index = 0

    def select(self, codes: Any, index: int) -> None:
        self._codes, self._index = codes, index

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._codes is None:
            raise RuntimeError("ConditionedField: select(codes, index) a prompt before rendering")
        return self.generator.query(points, self._codes, self._index)
