"""Seeded tune/holdout splits of each task: the search sees only the tune part.

Each task's rows are shuffled with a generator seeded from the run's seed and the task's name
(so adding a task does not reshuffle the others), and the last ``round(holdout × rows)`` rows
go to the holdout part. Both parts keep the rows' original order.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence

from loramerge.errors import DataError, InvalidParameter
from loramerge.runtime.data import Task


def split_task(task: Task, holdout: float, seed: int = 0) -> tuple[Task, Task]:
    """``(tune, holdout)`` parts of ``task``; a part left without rows is an error naming the task.

    Example:
        >>> from loramerge.runtime.data import parse_row
        >>> rows = [parse_row({"text": f"row {i}"}, "t.jsonl", i + 1) for i in range(10)]
        >>> tune, held = split_task(Task("t", rows, "t.jsonl"), 0.3, seed=1)
        >>> len(tune), len(held), sorted(r.line for r in tune.rows + held.rows) == list(range(1, 11))
        (7, 3, True)
    """
    if not 0.0 < holdout < 1.0:
        raise InvalidParameter(f"--holdout must be a fraction between 0 and 1 (exclusive), got {holdout}",
                               parameter="holdout")
    count = len(task.rows)
    held = round(holdout * count)
    if held == 0 or held == count:
        part = "holdout" if held == 0 else "tune"
        raise DataError(f"{task.source}: task {task.name!r} has {count} row(s); --holdout {holdout} leaves its "
                        f"{part} part empty (give more rows or another --holdout)")
    order = list(range(count))
    random.Random(zlib.crc32(f"{seed}:{task.name}".encode())).shuffle(order)
    chosen = set(order[count - held:])
    tune_rows = [row for i, row in enumerate(task.rows) if i not in chosen]
    held_rows = [row for i, row in enumerate(task.rows) if i in chosen]
    return Task(task.name, tune_rows, task.source), Task(task.name, held_rows, task.source)


def split_tasks(tasks: Sequence[Task], holdout: float, seed: int = 0) -> tuple[list[Task], list[Task]]:
    """The tune parts and the holdout parts of every task (see :func:`split_task`)."""
    pairs = [split_task(task, holdout, seed) for task in tasks]
    return [tune for tune, _ in pairs], [held for _, held in pairs]
