"""Tokens from a cache: prefill of a layout's computed segments, decoding, sampling, and the reference.

`generate` runs after the cached prefix is in the cache; `recompute` is the reference the cached path
must match: one forward over the whole layout with its equivalent mask, no stored cache read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .adapter import StaticDecoder, causal_allowed, recomputing
from .blend import Plan
from .model import GritModel
from .prompts import Segment, layout_allowed

OnToken = Callable[[str], "bool | None"]  # gets each new piece of text; returning True stops generation


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 decodes greedily
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says


@dataclass
class Generated:
    token_ids: list[int]
    first_logits: torch.Tensor  # (vocab,) float32, at the first generated token
    prefill_s: float
    decode_s: float


def generate(model: GritModel, layout: list[Segment], cache, n_cached: int, sampling: Sampling,
             on_token: OnToken | None = None, static: bool = False, recompute: Plan | None = None) -> Generated:
    """Prefill the layout's computed tokens after the `n_cached` cached ones, then decode.

    `recompute`: the cached tokens recomputed in the same pass (blend.choose). `static`
    decodes at a fixed shape over the reserved cache (adapter.StaticDecoder): on a GPU the step is
    then captured once in a CUDA graph and replayed. The tokens are the same either way.
    """
    t0 = time.perf_counter()
    hidden = prefill(model, layout, cache, n_cached, [], recompute)
    logits = model.logits(hidden[0, -1])
    prefill_s = time.perf_counter() - t0
    tokens, decode_s = decode(model, cache, logits, n_cached + hidden.shape[1], sampling, on_token, static)
    return Generated(tokens, logits, prefill_s, decode_s)


@torch.inference_mode()
def prefill(model: GritModel, layout: list[Segment], cache, n_cached: int, follow: list[int],
            recompute: Plan | None = None) -> torch.Tensor:
    """One pass over the layout's computed tokens, then `follow`, after the `n_cached` cached ones in
    `cache`; their last hidden states (1, q, hidden).

    The cached tokens of `recompute` (blend.Plan) ride in the same pass, in front, each at its own
    position seeing the prefix up to itself: their keys and values replace the cached ones layer by
    layer, in as many layers as the plan carries each, so the tokens after them read the repaired
    cache, and the weights are read once for both.
    """
    rest = [t for s in layout if not s.cached for t in s.token_ids] + follow
    device = model.device
    ids = torch.tensor(rest, device=device)[None]
    positions = torch.arange(n_cached, n_cached + len(rest), device=device)[None]
    allowed = causal_allowed(len(rest), n_cached, device)  # (1, q, n_cached + q)
    if recompute is None or len(recompute.positions) == 0:
        return model.forward(ids, positions, allowed, cache)[0]
    chosen = recompute.positions  # (k,)
    prefix = torch.tensor([t for s in layout if s.cached for t in s.token_ids], device=device)
    cols = torch.arange(n_cached + len(rest), device=device)
    redo = (cols[None, :] <= chosen[:, None])[None]  # (1, k, n_cached + q): the prefix up to itself
    with recomputing(model.hf, cache, chosen, recompute.carried) as both:
        hidden, _ = model.forward(torch.cat([prefix[chosen][None], ids], 1), torch.cat([chosen[None], positions], 1),
                                  torch.cat([redo, allowed], 1), both)
    return hidden[:, recompute.carried[-1]:]  # the recomputed tokens the last layer still carried come first


def recompute(model: GritModel, layout: list[Segment], sampling: Sampling) -> tuple[list[int], torch.Tensor]:
    """Tokens and first-step logits from one full forward with the layout's equivalent mask."""
    ids = torch.tensor([t for s in layout for t in s.token_ids], device=model.device)[None]
    positions = torch.arange(ids.shape[1], device=model.device)[None]
    allowed = layout_allowed(layout).to(model.device)[None]
    hidden, cache = model.forward(ids, positions, allowed)
    logits = model.logits(hidden[0, -1])
    tokens, _ = decode(model, cache, logits, ids.shape[1], sampling, None)
    return tokens, logits


@torch.inference_mode()
def decode(model: GritModel, cache, logits: torch.Tensor, position: int, sampling: Sampling,
           on_token: OnToken | None, static: bool = False) -> tuple[list[int], float]:
    """Sample from `logits`, feed each token back at `position` onwards; (tokens, seconds)."""
    t0 = time.perf_counter()
    stepper = StaticDecoder(model.hf, cache, position, model.dtype, model.device) if static else None
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed) if sampling.seed is not None else None
    tokens: list[int] = []
    shown = ""
    while True:
        token = sample(logits, sampling.temperature, sampling.top_p, generator)
        if token == model.eos_id and not sampling.ignore_eos:
            break
        tokens.append(token)
        if on_token is not None:
            text = model.decode(tokens)
            if not text.endswith("\ufffd"):  # else a character is split across tokens: wait for its rest
                stop = on_token(text[len(shown):])
                shown = text
                if stop is True:  # only a literal True: print-like callbacks return other things
                    break
        if len(tokens) >= sampling.max_new_tokens:
            break
        if stepper is not None:
            hidden = stepper.step(token)
        else:
            ids = torch.tensor([[token]], device=model.device)
            hidden, cache = model.forward(ids, torch.tensor([[position]], device=model.device), None, cache)
        logits = model.logits(hidden[0, -1])
        position += 1
    rest = model.decode(tokens)[len(shown):] if on_token is not None else ""
    if rest:  # generation ended inside a split character: stream what the answer itself holds
        on_token(rest)
    return tokens, time.perf_counter() - t0


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def forced_logits(model: GritModel, layout: list[Segment], cache, n_cached: int, follow: list[int],
                  recompute: Plan | None = None) -> torch.Tensor:
    """(1 + len(follow), vocab) float32: the next-token logits after the layout, then after each token of
    `follow` fed in (teacher forcing), on the cached path (with `recompute` as in `prefill`)."""
    hidden = prefill(model, layout, cache, n_cached, follow, recompute)
    return model.logits(hidden[0, hidden.shape[1] - len(follow) - 1 :])


@torch.inference_mode()
def full_attention_logits(model: GritModel, layout: list[Segment], follow: list[int]) -> torch.Tensor:
    """The same logits from one causal pass over the layout's tokens: nothing cached, everything attends
    to everything before it (for a caching mode, the full recompute of its layout order)."""
    tokens = [t for s in layout for t in s.token_ids]
    ids = torch.tensor(tokens + follow, device=model.device)[None]
    positions = torch.arange(ids.shape[1], device=model.device)[None]
    hidden, _ = model.forward(ids, positions, causal_allowed(ids.shape[1], 0, model.device))
    return model.logits(hidden[0, len(tokens) - 1 :])
