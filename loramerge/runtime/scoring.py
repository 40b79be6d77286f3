"""Batched teacher-forced scoring of token sequences, and the per-task figures built from it.

Sequences are sorted by length and padded on the right to the longest of their batch, with an
attention mask, so padding changes neither the positions nor the attention of real tokens. Only
the logits of scored positions are turned into log-probabilities (in float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from loramerge.runtime.data import Task, TaskKind
from loramerge.runtime.encoding import Encoded


@dataclass(frozen=True)
class SequenceScores:
    """Per sequence: summed log-probability of the scored tokens, their count, and how many are the argmax."""

    logprob: torch.Tensor  # float64 (N,)
    tokens: torch.Tensor  # int64 (N,)
    correct: torch.Tensor  # int64 (N,)


def batches(encoded: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Indices of ``encoded`` in batches of similar length (longest first, so memory peaks at once).

    Example:
        >>> seqs = [Encoded((1, 2), 1, 0), Encoded((1, 2, 3, 4), 1, 1), Encoded((1, 2, 3), 1, 2)]
        >>> batches(seqs, 2)
        [[1, 2], [0]]
    """
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].ids), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_right(sequences: Sequence[Sequence[int] | torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of sequences padded on the right to the longest.

    Example:
        >>> ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


def forward_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   kind: str | None = "causal") -> torch.Tensor:
    """The model's output scores for a padded batch: transformers' ``.logits``, else its last hidden state.

    An encoder-decoder model gets the same tokens on both sides (``verify`` compares two versions
    of one model on identical inputs, so any input will do).
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if kind == "seq2seq":
        kwargs.update(decoder_input_ids=input_ids, decoder_attention_mask=attention_mask)
    if kind in ("causal", "seq2seq"):
        kwargs["use_cache"] = False
    output = model(**kwargs)
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


def score_sequences(model: nn.Module, encoded: Sequence[Encoded], *, batch_size: int = 8, pad_id: int = 0,
                    device: torch.device | None = None, desc: str | None = None, progress: bool = False,
                    kind: str | None = None) -> SequenceScores:
    """Teacher-forced log-probability, token count and argmax hits of every sequence.

    Example:
        >>> class Uniform(nn.Module):  # every token equally likely: log p = -log V
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return torch.zeros(*input_ids.shape, 4)
        >>> s = score_sequences(Uniform(), [Encoded((1, 2, 3), 1, 0)])
        >>> round(float(s.logprob[0]), 4), int(s.tokens[0])
        (-2.7726, 2)
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    count = len(encoded)
    logprob = torch.zeros(count, dtype=torch.float64)
    tokens = torch.tensor([e.scored for e in encoded], dtype=torch.int64)
    correct = torch.zeros(count, dtype=torch.int64)
    groups = batches(encoded, batch_size)
    with torch.inference_mode():
        for group in tqdm(groups, desc=desc, unit="batch", disable=True if not progress else None, leave=False):
            ids, mask = pad_right([encoded[i].ids for i in group], pad_id)
            scored = torch.zeros(ids.shape, dtype=torch.bool)
            for row, i in enumerate(group):
                scored[row, encoded[i].start:len(encoded[i].ids)] = True
            ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
            logits = forward_logits(model, ids, mask, kind)
            # Token j is predicted by the logits at j - 1.
            target_mask = scored[:, 1:]
            picked = logits[:, :-1][target_mask].float().log_softmax(-1)
            targets = ids[:, 1:][target_mask]
            token_logprob = picked.gather(1, targets[:, None]).squeeze(1)
            hits = picked.argmax(-1) == targets
            owner = torch.arange(len(group), device=device)[:, None].expand_as(target_mask)[target_mask]
            index = torch.tensor(group, device=device)[owner]
            logprob.index_add_(0, index.cpu(), token_logprob.double().cpu())
            correct.index_add_(0, index.cpu(), hits.long().cpu())
    return SequenceScores(logprob, tokens, correct)


@dataclass(frozen=True)
class TaskScore:
    """A task's figures for one model.

    ``loss`` is the token-weighted mean negative log-likelihood over the whole task (scored
    tokens: completions, texts, the right choices). ``accuracy`` is the fraction of rows right:
    for completions, every completion token is the argmax; for multiple choice, the right choice
    has the highest summed log-likelihood. ``token_accuracy`` is the fraction of completion tokens
    that are the argmax. ``value`` is a user scoring function's result.
    """

    task: str
    kind: TaskKind
    rows: int
    tokens: int = 0
    loss: float | None = None
    accuracy: float | None = None
    token_accuracy: float | None = None
    value: float | None = None

    @property
    def perplexity(self) -> float | None:
        return math.exp(self.loss) if self.loss is not None and self.loss < 700 else (
            None if self.loss is None else math.inf)

    @property
    def metric(self) -> str:
        """The name of :attr:`score`: ``acc`` (completions, choices), ``ppl`` (texts) or ``score`` (custom)."""
        return {"completion": "acc", "choice": "acc", "text": "ppl", "custom": "score"}[self.kind]

    @property
    def score(self) -> float:
        """The task's headline figure: accuracy, perplexity for text tasks, or the custom value."""
        if self.kind == "custom":
            assert self.value is not None
            return self.value
        if self.kind == "text":
            assert self.perplexity is not None
            return self.perplexity
        assert self.accuracy is not None
        return self.accuracy

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "text"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "kind": self.kind, "rows": self.rows, "metric": self.metric,
                               "score": self.score}
        for key in ("tokens", "loss", "accuracy", "token_accuracy", "perplexity", "value"):
            value = getattr(self, key)
            if value is not None and (key != "tokens" or self.kind != "custom"):
                out[key] = value
        return out


def task_score(task: Task, encoded: Sequence[Encoded], scores: SequenceScores) -> TaskScore:
    """Fold per-sequence scores into the task's figures (see :class:`TaskScore`)."""
    kind = task.kind
    rows = len(task.rows)
    if kind == "choice":
        best: dict[int, tuple[float, int]] = {}
        right_logprob, right_tokens = 0.0, 0
        for seq, lp, n in zip(encoded, scores.logprob.tolist(), scores.tokens.tolist()):
            if seq.row not in best or lp > best[seq.row][0]:
                best[seq.row] = (lp, seq.choice)
            if seq.choice == int(task.rows[seq.row].data["answer"]):
                right_logprob += lp
                right_tokens += n
        hits = sum(1 for row, (_, choice) in best.items() if choice == int(task.rows[row].data["answer"]))
        return TaskScore(task.name, kind, rows, right_tokens, -right_logprob / right_tokens, hits / rows)
    total_tokens = int(scores.tokens.sum())
    loss = -float(scores.logprob.sum()) / total_tokens
    if kind == "text":
        return TaskScore(task.name, kind, rows, total_tokens, loss)
    exact = float((scores.correct == scores.tokens).double().mean())
    return TaskScore(task.name, kind, rows, total_tokens, loss, exact, float(scores.correct.sum()) / total_tokens)


ScoreFunction = Callable[[nn.Module, list[dict[str, Any]]], float]
