"""Evaluation data: JSONL files, one per task, whose rows are one of four types.

- ``{"prompt": ..., "completion": ...}``: the completion's token loss given the prompt, its token
  accuracy, and whether every completion token is the argmax (exact match under teacher forcing);
- ``{"text": ...}``: the text's token loss (perplexity);
- ``{"prompt": ..., "choices": [...], "answer": i}``: multiple choice, the choice of highest
  summed log-likelihood wins (lm-evaluation-harness's ``acc``);
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat, rendered with the tokenizer's
  chat template; the last (assistant) turn is the completion.

A task is named after its file (``math.jsonl`` → ``math``) or explicitly (``NAME=FILE``). Every
row of a task must be of the same family (completions and chats mix; text and multiple choice
stand alone), so that a task has one metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loramerge.errors import DataError, SourceNotFound
from loramerge.io.structured import parse_json, special_file_reason

RowKind = Literal["completion", "text", "choice", "chat"]
TaskKind = Literal["completion", "text", "choice", "custom"]
_FAMILY: dict[str, TaskKind] = {"completion": "completion", "chat": "completion", "text": "text", "choice": "choice"}


@dataclass(frozen=True)
class Row:
    """One evaluation row; ``data`` is the JSON object as read and ``line`` its 1-based line number."""

    kind: RowKind
    data: Mapping[str, Any]
    line: int = 0

    @property
    def prompt(self) -> str:
        return str(self.data.get("prompt", ""))


@dataclass
class Task:
    """A named list of rows read from ``source``.

    Example:
        >>> t = Task("add", [parse_row({"prompt": "1+1=", "completion": "2"}, "add.jsonl", 1)], "add.jsonl")
        >>> t.kind, len(t)
        ('completion', 1)
    """

    name: str
    rows: list[Row]
    source: str = "<memory>"
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kind(self) -> TaskKind:
        kinds = {_FAMILY[r.kind] for r in self.rows}
        return kinds.pop() if len(kinds) == 1 else "custom"

    def where(self, row: Row) -> str:
        """``file: row N`` for messages."""
        return f"{self.source}: row {row.line}"


def parse_row(obj: Any, source: str, line: int) -> Row:
    """Classify one JSON object as a row type, or raise :class:`DataError` naming the file and row.

    Example:
        >>> parse_row({"text": "hello"}, "t.jsonl", 3).kind
        'text'
        >>> parse_row({"question": "?"}, "t.jsonl", 4)
        Traceback (most recent call last):
        ...
        loramerge.errors.DataError: t.jsonl: row 4: no row type fits the fields question; a row has prompt+completion, text, prompt+choices+answer, or messages
    """
    where = f"{source}: row {line}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        _check_messages(obj["messages"], where)
        return Row("chat", obj, line)
    if "choices" in obj:
        choices, answer = obj.get("choices"), obj.get("answer")
        if "prompt" not in obj or not isinstance(obj["prompt"], str):
            raise DataError(f"{where}: a multiple-choice row needs a string 'prompt'")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: 'answer' must be the index of the right choice (0 to {len(choices) - 1}), "
                            f"got {answer!r}")
        return Row("choice", obj, line)
    if "completion" in obj:
        if not isinstance(obj.get("prompt", ""), str) or not isinstance(obj["completion"], str):
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings")
        if not obj["completion"]:
            raise DataError(f"{where}: empty 'completion'; there is nothing to score")
        return Row("completion", obj, line)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Row("text", obj, line)
    fields = ", ".join(sorted(obj)) or "none"
    raise DataError(f"{where}: no row type fits the fields {fields}; a row has prompt+completion, text, "
                    "prompt+choices+answer, or messages")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's turn (it is the completion scored), "
                        f"got role {messages[-1]['role']!r}")


def read_rows(path: str | Path, *, limit: int | None = None, validate: bool = True) -> list[Row]:
    """The rows of a JSONL file (blank lines skipped), at most ``limit`` of them.

    With ``validate=False`` any JSON object is kept (as a row of kind ``text`` in name only), for
    a user's own scoring function.
    """
    file = Path(path)
    reason = special_file_reason(file)
    if reason is not None:
        raise DataError(f"{path}: {reason}")
    if not file.is_file():
        raise SourceNotFound(f"{path}: no such data file")
    rows: list[Row] = []
    with open(file, encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not raw.strip():
                continue
            # One bounded parse per row (nesting, integer size): a hostile row is one error line.
            obj = parse_json(raw, name=f"{path}: row {number}", error=DataError, want_object=False, lines=False)
            if validate:
                rows.append(parse_row(obj, str(path), number))
            elif not isinstance(obj, dict):
                raise DataError(f"{path}: row {number}: a row must be a JSON object, got {type(obj).__name__}")
            else:
                rows.append(Row("text", obj, number))
    return rows


DataSpec = str | Path | Task | tuple[str, str | Path]


def load_task(spec: DataSpec, *, limit: int | None = None, validate: bool = True) -> Task:
    """One task from ``FILE``, ``NAME=FILE``, ``(NAME, FILE)`` or a :class:`Task` (kept, cut to ``limit``).

    An empty task and a file that mixes row families are errors naming the file.
    """
    if isinstance(spec, Task):
        task = spec if limit is None or len(spec) <= limit else Task(spec.name, spec.rows[:limit], spec.source)
    else:
        name, path = task_name_and_path(spec)
        task = Task(name, read_rows(path, limit=limit, validate=validate), str(path))
    if not task.rows:
        raise DataError(f"{task.source}: task {task.name!r} has no rows")
    if validate and task.kind == "custom":
        first: dict[str, Row] = {}
        for row in task.rows:
            first.setdefault(_FAMILY[row.kind], row)
        shown = ", ".join(f"{kind} (row {row.line})" for kind, row in first.items())
        raise DataError(f"{task.source}: task {task.name!r} mixes row types {shown}; put each kind in its own file")
    return task


def load_tasks(data: DataSpec | Sequence[DataSpec] | Mapping[str, str | Path | Sequence[Mapping[str, Any]]], *,
               limit: int | None = None, validate: bool = True) -> list[Task]:
    """Tasks from files (``FILE`` or ``NAME=FILE``), :class:`Task` objects, or a mapping name → file or rows.

    Task names must be distinct. ``limit`` keeps the first rows of each task.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "qa.jsonl"
        >>> _ = f.write_text('{"prompt": "2+2=", "completion": "4"}\\n{"text": "x"}\\n')
        >>> load_tasks({"qa": [{"prompt": "1+1=", "completion": "2"}]})[0].kind
        'completion'
        >>> load_tasks([f])
        Traceback (most recent call last):
        ...
        loramerge.errors.DataError: ...qa.jsonl: task 'qa' mixes row types completion (row 1), text (row 2); put each kind in its own file
    """
    if isinstance(data, Mapping):
        specs: list[DataSpec] = []
        for name, value in data.items():
            if isinstance(value, (str, Path)):
                specs.append((str(name), value))
            else:
                rows = [parse_row(obj, f"<{name}>", i) if validate else Row("text", obj, i)
                        for i, obj in enumerate(value, start=1)]
                specs.append(Task(str(name), rows, f"<{name}>"))
    elif isinstance(data, (str, Path, Task, tuple)):
        specs = [data]
    else:
        specs = list(data)
    tasks = [load_task(spec, limit=limit, validate=validate) for spec in specs]
    seen: dict[str, str] = {}
    for task in tasks:
        if task.name in seen:
            raise DataError(f"{task.source}: task name {task.name!r} is also used by {seen[task.name]}; "
                            "name tasks with NAME=FILE")
        seen[task.name] = task.source
    return tasks


def task_name_and_path(spec: str | Path | tuple[str, str | Path]) -> tuple[str, Path]:
    """A task's name and file from ``FILE``, ``NAME=FILE`` or ``(NAME, FILE)``.

    Example:
        >>> task_name_and_path("math=/data/m.jsonl"), task_name_and_path("/data/code.jsonl")
        (('math', PosixPath('/data/m.jsonl')), ('code', PosixPath('/data/code.jsonl')))
    """
    if isinstance(spec, tuple):
        return spec[0], Path(spec[1])
    text = str(spec)
    if not isinstance(spec, Path) and "=" in text and not Path(text).exists():
        name, _, path = text.partition("=")
        if not name:
            raise DataError(f"{text}: a task spec is FILE or NAME=FILE")
        return name, Path(path)
    return Path(text).stem, Path(text)


def read_prompts(path: str | Path, *, limit: int | None = None) -> list[Row]:
    """Prompts for ``verify``: a JSONL file of evaluation rows, or plain text with one prompt per line.

    A ``.jsonl``/``.json`` file (or one whose first line is a JSON object) is read as rows; otherwise
    every non-blank line is a ``text`` row.
    """
    file = Path(path)
    if not file.is_file():
        raise SourceNotFound(f"{path}: no such prompts file")
    with open(file, encoding="utf-8") as fh:
        lines = [(i, line.rstrip("\n")) for i, line in enumerate(fh, start=1)]
    first = next((text for _, text in lines if text.strip()), "")
    if file.suffix in (".jsonl", ".json") or first.lstrip().startswith("{"):
        rows = read_rows(file, limit=limit)
    else:
        rows = [Row("text", {"text": text}, i) for i, text in lines if text.strip()][:limit]
    if not rows:
        raise DataError(f"{path}: no prompts in the file")
    return rows
