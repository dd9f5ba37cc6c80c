"""A deterministic text encoder for the procedural-scene prompts (and any other short text).

Why not a small pretrained encoder (CLIP, T5): none ships its weights inside a pip package, and the
CPU benchmark must run without downloads. Why this one: it needs no training, gives every process on
every machine the same embedding (sha256, not Python's salted `hash`), and is compositional: a token is
a fixed random vector per *word* plus a sinusoidal position code, so "a purple torus" is made of the
same "purple" and "torus" vectors the amortized trainer saw in other combinations (the held-out
split of `trainers.reference.scenes`), and word order ("red cube on a blue sphere" vs "blue cube on a red
sphere") is kept. The output is a token sequence [N, max_length, dim] like CLIP's last hidden state,
padded with zeros; the empty prompt (the unconditional one) is all zeros.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from pydantic import Field, field_validator

from trainers.config_base import ConfigBase

_WORD = re.compile(r"[a-z0-9]+")


class TextEncoderConfig(ConfigBase):
    dim: int = Field(64, ge=1)
    # Longest scene prompt with a view suffix has 11 words; longer texts are truncated.
    max_length: int = Field(16, ge=1)
    # Changes every word vector (a different "vocabulary"); embeddings from different seeds don't mix.
    seed: int = 0
    # Scale of the position code relative to the unit-norm word vectors.
    position_scale: float = 0.5

    @field_validator("dim")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("text_encoder.dim must be even (the sinusoidal position code pairs sin and cos)")
        return value


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers; punctuation separates words and is dropped."""
    return _WORD.findall(text.lower())


class SceneTextEncoder:
    """`encode(prompts) -> [N, max_length, dim]` float32, identical on every machine."""

    def __init__(self, cfg: TextEncoderConfig | None = None):
        self.cfg = cfg or TextEncoderConfig()
        self._word_cache: dict[str, torch.Tensor] = {}
        self.positions = self._position_code()

    def word_vector(self, word: str) -> torch.Tensor:
        """A unit vector drawn from a generator seeded by sha256(seed, word)."""
        if word not in self._word_cache:
            digest = hashlib.sha256(f"{self.cfg.seed}:{word}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            vector = torch.randn(self.cfg.dim, generator=generator)
            self._word_cache[word] = vector / vector.norm()
        return self._word_cache[word]

    def _position_code(self) -> torch.Tensor:
        position = torch.arange(self.cfg.max_length, dtype=torch.float32)[:, None]
        frequency = torch.exp(
            -math.log(100.0) * torch.arange(0, self.cfg.dim, 2, dtype=torch.float32) / self.cfg.dim
        )
        code = torch.zeros(self.cfg.max_length, self.cfg.dim)
        code[:, 0::2] = torch.sin(position * frequency)
        code[:, 1::2] = torch.cos(position * frequency)
        # Each row has norm sqrt(dim / 2) before scaling; make it `position_scale`.
        return code * (self.cfg.position_scale / math.sqrt(self.cfg.dim / 2))

    def encode(self, prompts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.cfg.max_length, self.cfg.dim)
        for row, prompt in enumerate(prompts):
            words = tokenize(prompt)[: self.cfg.max_length]
            for position, word in enumerate(words):
                out[row, position] = self.word_vector(word) + self.positions[position]
        return out

    __call__ = encode

    def decode(self, embeddings: torch.Tensor, vocabulary: list[str]) -> list[str]:
        """Embeddings [N, L, dim] -> texts, each token read as its nearest word in `vocabulary`.

        Lets a consumer that only sees embedding rows (the reference prior, handed rows that guidance
        mixed from conditional and unconditional ones) recover the prompt without a lookup table.
        A zero token is padding; an all-zero row decodes to "".
        """
        words = sorted(set(vocabulary))
        table = torch.stack([self.word_vector(w) for w in words]).to(embeddings)  # [V, dim]
        tokens = embeddings - self.positions[: embeddings.shape[1]].to(embeddings)
        present = embeddings.norm(dim=-1) > 1e-6  # [N, L]
        nearest = (tokens @ table.T).argmax(dim=-1)  # [N, L]
        return [
            " ".join(words[i] for i, keep in zip(row_ids.tolist(), row_mask.tolist(), strict=True) if keep)
            for row_ids, row_mask in zip(nearest, present, strict=True)
        ]
