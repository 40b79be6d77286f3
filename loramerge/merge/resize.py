"""Re-ranking one LoRA: :func:`resize`, kohya's ``resize_lora.py`` done with the factored SVD.

Each module's update ΔW = s·B@A is decomposed from its factors (QR of B and Aᵀ, then an SVD of
the small r×r core; :func:`~loramerge.core.linalg.factored_svd`), never as the dense out×in
matrix kohya's script builds, and truncated by the rank policy: a fixed ``rank``, ``energy``,
``max_error``, or kohya's dynamic methods ``sv_ratio``, ``sv_cumulative`` and ``sv_fro``
(:class:`~loramerge.core.rank.RankPolicy`), capped by ``rank_max``. The truncation is the best
one of its rank (Eckart–Young), and the report gives every module's rank before and after, the
energy kept and the relative error. LyCORIS LoHa/LoKr modules are read as their exact B@A, so
they resize the same way (into a plain LoRA).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from loramerge.core.adapter import Adapter
from loramerge.core.rank import RankPolicy
from loramerge.errors import InvalidParameter
from loramerge.io.sources import load
from loramerge.merge.blocks import BlockWeighting
from loramerge.merge.engine import merge


def resize(
    adapter: Adapter | str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    sv_fro: float | None = None,
    rank_max: int | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
    compute_dtype: torch.dtype | str = torch.float32,
    block_weights: BlockWeighting | str | Sequence[str] | None = None,
    progress: bool = False,
) -> Adapter:
    """``adapter`` re-ranked module by module under the rank policy; the result carries a report.

    At least one of the policy options must be given (``rank_max`` alone caps every module). The
    result keeps the source's base model, architectures and kohya training metadata; its report
    (``.report``) is the one :func:`~loramerge.merge.engine.merge` gives for the ``svd`` method,
    which is what a resize is: the exact update of one source, re-ranked.

    Example:
        >>> import torch
        >>> from loramerge import Adapter, LowRank
        >>> g = torch.Generator().manual_seed(0)
        >>> B = torch.randn(40, 8, generator=g) * torch.tensor([8.0, 4, 2, 1, .5, .25, .1, .05])
        >>> lora = Adapter({"fc": LowRank(torch.randn(8, 30, generator=g), B)})
        >>> small = resize(lora, sv_fro=0.99)
        >>> small["fc"].rank, small.report.modules[0].relative_error < 0.15
        (3, True)
    """
    policy = RankPolicy.from_options(rank=rank, energy=energy, max_error=max_error, sv_ratio=sv_ratio,
                                     sv_cumulative=sv_cumulative, sv_fro=sv_fro, rank_max=rank_max)
    if policy.is_exact:
        raise InvalidParameter("resize needs a rank policy: --rank, --energy, --max-error, --sv-ratio, "
                               "--sv-cumulative, --sv-fro or --rank-max", parameter="rank")
    source = load(adapter)
    resized = merge([source], method="svd", **policy.as_dict(), device=device, dtype=dtype,
                    compute_dtype=compute_dtype, block_weights=block_weights, progress=progress)
    metadata = source.config.get("metadata")
    if metadata:
        resized.config = {**resized.config, "metadata": metadata}
    return resized
