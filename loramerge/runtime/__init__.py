"""The model in the loop: a resident base model with adapters swapped in memory, evaluation data and scores,
verification of merges and folds, and the activation statistics of data-aware methods.

transformers is imported only when a model is loaded (the ``eval`` extra).
"""

from loramerge.runtime.data import Row, Task, load_task, load_tasks, read_prompts
from loramerge.runtime.evaluate import Evaluation, evaluate
from loramerge.runtime.merging import merge
from loramerge.runtime.resident import Runtime
from loramerge.runtime.scoring import TaskScore
from loramerge.runtime.statistics import input_statistics
from loramerge.runtime.verify import Verification, verify

__all__ = [
    "Evaluation",
    "Row",
    "Runtime",
    "Task",
    "TaskScore",
    "Verification",
    "evaluate",
    "input_statistics",
    "load_task",
    "load_tasks",
    "merge",
    "read_prompts",
    "verify",
]
