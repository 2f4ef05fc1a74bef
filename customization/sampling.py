"""From one row's logits to its next token, and from its tokens to the text it may release.

Pure functions of their arguments (the decoder keeps the per-request state): penalties, then
greedy or temperature / top-k / top-p sampling with the request's own generator; and the
release rule that never lets a stop string, or a prefix that could still become one, out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from customization.config import GenerationConfig


def _apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> None:
    if penalty == 1.0 or not seen:
        return
    index = torch.tensor(sorted(set(seen)), device=logits.device)
    values = logits[index]
    logits[index] = torch.where(values > 0, values / penalty, values * penalty)


def _apply_openai_penalties(
    logits: torch.Tensor, generated: list[int], config: GenerationConfig
) -> None:
    if not generated or (config.frequency_penalty == 0.0 and config.presence_penalty == 0.0):
        return
    tokens, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
    logits[tokens] -= config.frequency_penalty * counts.to(logits.dtype) + config.presence_penalty


def sample_token(
    logits: torch.Tensor,
    config: GenerationConfig,
    *,
    prompt_ids: list[int],
    generated: list[int],
    generator: torch.Generator | None,
) -> int:
    """Pick the next token of one sequence from its logits (V,)."""
    logits = logits.clone()
    _apply_repetition_penalty(logits, prompt_ids + generated, config.repetition_penalty)
    _apply_openai_penalties(logits, generated, config)
    if config.greedy:
        return int(logits.argmax())
    logits = logits / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1])).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = sorted_probs.cumsum(-1) - sorted_probs < config.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    # The generator lives on the CPU (seeds then reproduce on any device): sample there.
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _stop_prefix_at_end(text: str, stop: str) -> int:
    """Length of the longest proper prefix of ``stop`` that ``text`` ends with.

    Only the last ``len(stop) - 1`` characters can take part, and a match must begin with
    ``stop[0]``: the scan jumps between those with ``str.find`` and stops at the first
    (longest) match, so a step costs about ``len(stop)`` character operations, never the
    ``len(stop) ** 2`` of trying every prefix length.
    """
    tail = text[max(0, len(text) - len(stop) + 1) :] if len(stop) > 1 else ""
    start = tail.find(stop[0])
    while start >= 0:
        if stop.startswith(tail[start:]):
            return len(tail) - start
        start = tail.find(stop[0], start + 1)
    return 0


def releasable_text(
    text: str, released: str, stops: Sequence[str], *, finished: bool
) -> tuple[str, bool]:
    """(the text a sequence may have released by now, whether a stop string ended it).

    ``text`` is everything decoded so far and ``released`` what went out before. Released
    text holds back any suffix that could grow into a stop string, so a new occurrence
    starts in the unreleased part: the search starts there, not at the beginning.
    """
    longest = max((len(s) for s in stops), default=0)
    origin = max(0, len(released) - longest)
    stop_at = min((index for s in stops if (index := text.find(s, origin)) >= 0), default=-1)
    if stop_at >= 0:
        return text[:stop_at], True
    if not finished:
        # Hold back an incomplete UTF-8 character and any suffix that could still grow
        # into a stop string.
        text = text.rstrip("\ufffd")
        hold = max((_stop_prefix_at_end(text, s) for s in stops), default=0)
        text = text[: len(text) - hold]
    return text, False
