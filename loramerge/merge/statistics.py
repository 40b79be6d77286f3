"""Input statistics for data-aware merge methods: per source, each module's input Gram matrix.

The statistics are collected elsewhere (by :mod:`loramerge.runtime.statistics`, which runs the
model); a method only receives them, through :attr:`ModuleInputs.statistics
<loramerge.merge.methods.base.ModuleInputs>`, so the merge layer never runs a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from loramerge.errors import InvalidParameter


@dataclass
class InputStatistics:
    """``grams[i][module]`` = G = mean over source i's tokens of x·xᵀ, x the module's input (``(in, in)``).

    ``tokens[i]`` is the number of token positions behind source i's Grams.

    Example:
        >>> stats = InputStatistics([{"fc": torch.eye(2)}, {}], [10, 0])
        >>> [g is None for g in stats.for_module("fc")]
        [False, True]
    """

    grams: list[dict[str, torch.Tensor]]
    tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = [0] * len(self.grams)

    @property
    def sources(self) -> int:
        return len(self.grams)

    def for_module(self, module: str) -> list[torch.Tensor | None]:
        """Each source's Gram for ``module`` (None where it was not collected)."""
        return [grams.get(module) for grams in self.grams]

    @classmethod
    def from_mappings(cls, grams: Sequence[Mapping[str, torch.Tensor]], tokens: Sequence[int] | None = None
                      ) -> InputStatistics:
        return cls([dict(g) for g in grams], list(tokens) if tokens is not None else [])

    def check_sources(self, count: int, method: str) -> None:
        if self.sources != count:
            raise InvalidParameter(f"method {method!r}: input statistics for {self.sources} source(s) but "
                                   f"{count} source(s) to merge; give one data set per source, in order")
