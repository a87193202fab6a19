"""Sampling the next token: temperature, top-k, top-p, each row with a random stream of its own.

A row's stream is seeded from the run's seed, the prompt's key and the sample's number, and it draws one
uniform number per token, which picks the token from the row's filtered distribution (inverse CDF). So a
sample depends on its prompt, its number and the seed, never on which other rows share the batch, how
many there are, or when the row joined it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from qadapt.errors import QadaptError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0  # keep the most likely tokens whose probabilities sum to top_p
    top_k: int = 0  # keep the k most likely tokens (0: all)
    samples: int = 1  # per prompt
    seed: int = 0

    def __post_init__(self):
        problems = [f"{name} {why}" for name, ok, why in [
            ("temperature", self.temperature > 0, "must be positive (greedy decoding takes no sampling)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be 0 (off) or more"),
            ("samples", self.samples >= 1, "must be at least 1")] if not ok]
        if problems:
            raise QadaptError("sampling: " + "; ".join(problems))


def row_generator(seed: int, prompt_key: int, sample: int) -> torch.Generator:
    """The random stream of one sample of one prompt."""
    digest = hashlib.blake2b(f"{seed}:{prompt_key}:{sample}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def filtered_probabilities(logits: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities in decreasing order, their token ids) per row, after temperature, top-k and top-p; in
    fp32, the dropped tokens at probability 0."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    probs, order = probs.sort(dim=-1, descending=True)
    if sampling.top_k:
        probs[:, sampling.top_k:] = 0
    if sampling.top_p < 1:
        before = probs.cumsum(-1) - probs  # the mass of the more likely tokens
        probs[before >= sampling.top_p] = 0  # the most likely token always stays (0 before it)
    return probs / probs.sum(-1, keepdim=True), order


def sample_tokens(logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `logits`, each drawn with its row's generator."""
    probs, order = filtered_probabilities(logits, sampling)
    draws = torch.cat([torch.rand(1, generator=g) for g in generators]).to(probs.device)
    cumulative = probs.cumsum(-1)
    picks = torch.searchsorted(cumulative, draws[:, None] * cumulative[:, -1:]).clamp_max(probs.shape[-1] - 1)
    return order.gather(-1, picks).squeeze(-1)
