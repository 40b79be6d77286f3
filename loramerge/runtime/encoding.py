"""Rows to token sequences: the prompt and the completion are tokenized separately, then concatenated.

Tokenizing the two parts apart puts the boundary at the same place for every model and every
tokenizer merge rule, so the scored tokens are exactly the completion's. The prompt gets the
tokenizer's special tokens (its BOS), the completion none. A chat is rendered with the
tokenizer's chat template twice, without and with the last assistant turn; the difference is the
completion (so the template's end-of-turn tokens are scored too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loramerge.errors import DataError
from loramerge.runtime.data import Row, Task

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class Encoded:
    """One token sequence to score: tokens ``ids[start:]`` are scored given the ones before them.

    ``row`` is the row's index in its task and ``choice`` the index of the choice (multiple
    choice rows give one sequence per choice; -1 otherwise).
    """

    ids: tuple[int, ...]
    start: int
    row: int
    choice: int = -1

    @property
    def scored(self) -> int:
        return len(self.ids) - self.start


def context_length(config: Mapping[str, Any]) -> int | None:
    """The longest sequence the model takes, from its config (None when it declares none).

    Example:
        >>> context_length({"n_positions": 1024}), context_length({})
        (1024, None)
    """
    for holder in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = holder.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_and_completion(row: Row, tokenizer: Any, where: str) -> tuple[str, list[str], bool]:
    """``(prompt text, completion texts, prompt has special tokens)`` of a row; text rows have no prompt."""
    data = row.data
    if row.kind == "completion":
        return str(data.get("prompt", "")), [str(data["completion"])], True
    if row.kind == "choice":
        return str(data["prompt"]), [str(c) for c in data["choices"]], True
    if row.kind == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: a 'messages' row needs a tokenizer with a chat template, and this one has none")
        messages = list(data["messages"])
        try:
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # the template is user-supplied Jinja: any error is the data's
            raise DataError(f"{where}: the chat template failed on this row ({exc})") from None
        if not full.startswith(prompt):
            raise DataError(f"{where}: the chat template renders the conversation so that it does not start with "
                            "the rendered prompt; the completion cannot be cut out")
        return prompt, [full[len(prompt):]], False
    return "", [str(data["text"])], True


def encode_row(row: Row, index: int, tokenizer: Any, where: str) -> list[Encoded]:
    """The sequences of one row (one per choice for multiple choice)."""
    if row.kind == "text":
        ids = _ids(tokenizer, str(row.data["text"]), True)
        if len(ids) < 2:
            raise DataError(f"{where}: the text is a single token; there is nothing to score")
        return [Encoded(tuple(ids), 1, index)]
    prompt, completions, special = prompt_and_completion(row, tokenizer, where)
    prompt_ids = _ids(tokenizer, prompt, special) if prompt or special else []
    out = []
    for choice, completion in enumerate(completions):
        completion_ids = _ids(tokenizer, completion, False)
        if not completion_ids:
            raise DataError(f"{where}: the completion tokenizes to nothing")
        ids = prompt_ids + completion_ids
        start = max(1, len(prompt_ids))
        if start >= len(ids):
            raise DataError(f"{where}: the completion is the first token of the sequence; give a prompt")
        out.append(Encoded(tuple(ids), start, index, choice if row.kind == "choice" else -1))
    return out


def encode_task(task: Task, tokenizer: Any, context: int | None = None) -> list[Encoded]:
    """Every sequence of ``task``, cached on the task per tokenizer; a row longer than ``context`` is an error."""
    key = ("encoded", id(tokenizer), context)
    cached = task.cache.get(key)
    if cached is not None:
        return cached
    encoded: list[Encoded] = []
    for index, row in enumerate(task.rows):
        where = task.where(row)
        for item in encode_row(row, index, tokenizer, where):
            if context is not None and len(item.ids) > context:
                raise DataError(f"{where}: {len(item.ids)} tokens, longer than the model's context of {context} "
                                "tokens; shorten the row or drop it")
            encoded.append(item)
    task.cache[key] = encoded
    return encoded


def row_ids(row: Row, tokenizer: Any, where: str) -> list[int]:
    """The whole token sequence of a row (for a multiple-choice row: the prompt and its right answer)."""
    sequences = encode_row(row, 0, tokenizer, where)
    if row.kind == "choice":
        return list(sequences[int(row.data["answer"])].ids)
    return list(sequences[0].ids)
