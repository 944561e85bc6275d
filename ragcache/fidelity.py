"""How far a caching mode's next-token distributions drift from the full recompute of its layout order.

At the first answer token, and over the reference answer's tokens fed in one by one (teacher
forcing): the KL divergence KL(full || cached) in nats, and how often both put the same token first.
The full recompute is one causal pass over the very same tokens, so the drift is what caching (each
segment computed alone) costs, and 0 for `rag` and `none`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

NAMES = ("kl_first", "top1_first", "kl_answer", "top1_answer")


@dataclass
class Drift:
    kl_first: float  # nats, at the first answer token
    top1_first: float  # 1.0 when the cached and full paths rank the same token first
    kl_answer: float  # mean over the reference answer's tokens (the first token alone without one)
    top1_answer: float

    def to_dict(self) -> dict:
        return asdict(self)


def drift(cached: torch.Tensor, full: torch.Tensor) -> Drift:
    """cached, full: (positions, vocab) logits of the same positions."""
    log_p, log_q = torch.log_softmax(full.float(), -1), torch.log_softmax(cached.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0)  # (positions,)
    same = (full.argmax(-1) == cached.argmax(-1)).float()
    return Drift(float(kl[0]), float(same[0]), float(kl.mean()), float(same.mean()))
