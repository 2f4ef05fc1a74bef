"""Evaluation: held-out loss, token accuracy and final-answer exact match.

Loss and accuracy are computed on assistant tokens only, exactly as training measures them,
for the base alone (``carry_on=None``), base + carry-on or base + tail (a tail is scored
through the serving path: the base's forward with its rows' LoRA deltas). Exact match
decodes greedily, many problems per batch through the shared-base ``BatchDecoder``, and
compares the number after ``####`` (else the last number) with the reference's.

``evaluate_models`` puts the two together for several models on one held-out set, as the
CLI's ``eval`` and the web app's evaluations run it: the base forward over the set is shared
by every model (each chunk of examples runs through the base once, reading every state any
carry-on taps), and exact match decodes only problems whose reference ends in ``#### N``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from customization.answers import answers_match, checkable_examples, extract_final_answer
from customization.base_model import FrozenBase
from customization.carry_on import CarryOn
from customization.config import GenerationConfig
from customization.datasets import Example
from customization.decode_state import ServedAdapter
from customization.decoder import BatchDecoder
from customization.errors import TrainingCancelled
from customization.features import FeatureData, FeatureExample, StoredState, batch_hidden_states
from customization.tail import TailAdapter
from customization.tokenizer import TokenizedExample, tokenize_examples
from customization.training import FeatureLayout, evaluate, head_loss


def features_in_memory(
    base: FrozenBase, examples: Sequence[TokenizedExample], taps: Sequence[int], batch_size: int = 8
) -> FeatureData:
    """Hidden states for a small held-out set, computed now and kept in memory (float32)."""
    resolved = [base.resolve_tap(t) for t in taps]
    states = list(dict.fromkeys([(0, t) for t in resolved] + [(0, base.num_layers)]))
    rows: list[FeatureExample] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        hidden = batch_hidden_states([base], batch, states)
        for row, example in enumerate(batch):
            length = len(example.input_ids)
            rows.append(
                FeatureExample(
                    input_ids=torch.tensor(example.input_ids),
                    target_mask=torch.tensor(example.target_mask, dtype=torch.bool),
                    states=[StoredState(h[row, :length].float().cpu()) for h in hidden],
                )
            )
    return FeatureData(rows, states, [base.hidden_size] * len(states))


def heldout_metrics(
    base: FrozenBase,
    carry_on: ServedAdapter | None,
    data: FeatureData,
    *,
    batch_size: int = 8,
) -> dict[str, float]:
    """Held-out assistant-token loss and token accuracy."""
    if isinstance(carry_on, TailAdapter):
        return _tail_heldout_metrics(base, carry_on, data, batch_size)
    taps = carry_on.config.taps if carry_on is not None else (-1,)
    layout = FeatureLayout.for_taps(data, taps, base.num_layers)
    return evaluate(carry_on, data, layout, base.head_weight, batch_size=batch_size)


@torch.inference_mode()
def _tail_heldout_metrics(
    base: FrozenBase, tail: TailAdapter, data: FeatureData, batch_size: int
) -> dict[str, float]:
    """A tail's held-out metrics from the token ids alone, through the serving path."""
    decoder = BatchDecoder(base)
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        examples = data.examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), base.tokenizer.pad_token_id, dtype=torch.long)
        rows, labels = [], []
        for row, example in enumerate(examples):
            ids[row, : len(example.input_ids)] = example.input_ids
            predicts = torch.nonzero(example.target_mask[1:]).squeeze(-1)
            rows.append(predicts + row * width)
            labels.append(example.input_ids[predicts + 1])
        sequences = [decoder.new_sequence([1], GenerationConfig(), tail) for _ in examples]
        final = decoder._backbone(sequences, input_ids=ids.to(base.device)).last_hidden_state
        flat = final.reshape(-1, final.shape[-1]).index_select(0, torch.cat(rows).to(base.device))
        target = torch.cat(labels).to(base.device)
        loss, hits = head_loss(flat, base.head_weight, target)
        loss_sum += float(loss) * len(target)
        correct += hits
        count += len(target)
    return {"loss": loss_sum / max(count, 1), "token_accuracy": correct / max(count, 1)}


@dataclass
class ExactMatchResult:
    accuracy: float
    predictions: list[str]
    references: list[str]


def exact_match(
    base: FrozenBase,
    carry_on: ServedAdapter | None,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> ExactMatchResult:
    """Greedy final-answer accuracy: prompts are every message before the last assistant turn."""
    config = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    predictions: list[str] = []
    references: list[str] = []
    for start in range(0, len(examples), batch_size):
        decoder = BatchDecoder(base)
        sequences = []
        for example in examples[start : start + batch_size]:
            messages = list(example.messages)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = base.tokenizer.encode_prompt(messages[:last])
            references.append(messages[last]["content"])
            sequences.append(decoder.new_sequence(prompt, config, carry_on))
        for sequence in sequences:
            decoder.add(sequence)
        while decoder.active:
            decoder.step()
        predictions.extend(s.text for s in sequences)
        if progress is not None:
            progress(len(predictions), len(examples))
    hits = sum(
        answers_match(extract_final_answer(p), extract_final_answer(r))
        for p, r in zip(predictions, references, strict=True)
    )
    return ExactMatchResult(hits / max(len(examples), 1), predictions, references)


# -- several models on one held-out set --------------------------------------------------------


@dataclass
class ModelScores:
    """One model's figures; ``exact_match`` is None until decoded, or with no problem to check."""

    loss: float
    token_accuracy: float
    exact_match: float | None = None
    n_correct: int = 0
    predictions: list[str] | None = None


@dataclass
class EvaluationReport:
    n_examples: int  # scored for loss
    problems: list[Example]  # decoded for exact match (the checkable sample)
    scores: list[ModelScores]


def evaluate_models(
    base: FrozenBase,
    adapters: Sequence[ServedAdapter | None],
    examples: Sequence[Example],
    *,
    max_length: int,
    exact_match_problems: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    chunk_examples: int = 64,
    on_scores: Callable[[int, ModelScores], None] | None = None,
    should_stop: Callable[[float], bool] | None = None,
) -> EvaluationReport:
    """Held-out loss and token accuracy of each model (None: the base alone), then greedy
    exact match on the first ``exact_match_problems`` checkable examples.

    ``on_scores(i, scores)`` is called once model i's loss is known and again after its
    decoding; ``should_stop(fraction done)`` is asked between pieces of work, and True
    raises ``TrainingCancelled``. Chunks are a multiple of ``batch_size``, so the figures do
    not depend on the chunk size beyond float summation order.
    """
    if chunk_examples % batch_size:
        raise ValueError(f"chunk_examples ({chunk_examples}) must be a multiple of batch_size")
    tokenized = tokenize_examples(examples, base.tokenizer, max_length=max_length)
    problems = checkable_examples(examples)[:exact_match_problems]
    work = _Work(len(adapters) * (len(tokenized) + 8 * len(problems)), should_stop)
    scores = _heldout_scores(base, adapters, tokenized, batch_size, chunk_examples, work)
    for index, score in enumerate(scores):
        if on_scores is not None:
            on_scores(index, score)
    for index, adapter in enumerate(adapters):
        if not problems:
            break
        result = exact_match(
            base,
            adapter,
            problems,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=work.decoding(),
        )
        scores[index].exact_match = result.accuracy
        scores[index].n_correct = sum(
            answers_match(extract_final_answer(p), extract_final_answer(r))
            for p, r in zip(result.predictions, result.references, strict=True)
        )
        scores[index].predictions = result.predictions
        if on_scores is not None:
            on_scores(index, scores[index])
    return EvaluationReport(len(tokenized), list(problems), scores)


class _Work:
    """Counts units of work done and asks the caller whether to stop."""

    def __init__(self, total: int, should_stop: Callable[[float], bool] | None):
        self.total, self.done, self.should_stop = max(1, total), 0, should_stop
        self.advance(0)

    def decoding(self) -> Callable[[int, int], None]:
        """A progress callback for ``exact_match``: a decoded problem weighs 8 scored ones."""
        seen = [0]

        def progress(done: int, _total: int) -> None:
            self.advance(8 * (done - seen[0]))
            seen[0] = done

        return progress

    def advance(self, units: int) -> None:
        self.done += units
        if self.should_stop is not None and self.should_stop(min(1.0, self.done / self.total)):
            raise TrainingCancelled("the evaluation was stopped")


def _heldout_scores(
    base: FrozenBase,
    adapters: Sequence[ServedAdapter | None],
    tokenized: Sequence[TokenizedExample],
    batch_size: int,
    chunk_examples: int,
    work: _Work,
) -> list[ModelScores]:
    """Every model's loss and token accuracy, one base forward per chunk for all of them."""
    taps = sorted({t for a in adapters if isinstance(a, CarryOn) for t in a.config.taps})
    loss_sums = [0.0] * len(adapters)
    hit_sums = [0.0] * len(adapters)
    count = 0
    for start in range(0, len(tokenized), chunk_examples):
        chunk = tokenized[start : start + chunk_examples]
        data = features_in_memory(base, chunk, [*taps, -1], batch_size=batch_size)
        tokens = sum(int(e.target_mask[1:].sum()) for e in data.examples)
        count += tokens
        for index, adapter in enumerate(adapters):
            metrics = heldout_metrics(base, adapter, data, batch_size=batch_size)
            loss_sums[index] += metrics["loss"] * tokens
            hit_sums[index] += metrics["token_accuracy"] * tokens
            work.advance(len(chunk))
    return [
        ModelScores(loss=loss / max(count, 1), token_accuracy=hits / max(count, 1))
        for loss, hits in zip(loss_sums, hit_sums, strict=True)
    ]
