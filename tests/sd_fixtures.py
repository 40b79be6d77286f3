"""Shared builders for the image-generation format tests: random factors, hand-written kohya /
LyCORIS / diffusers key sets (following the key tables of reference/sd-ecosystem.md, not our
writers) and independent dense references computed in float64."""

from __future__ import annotations

import math

import torch

# A UNet with SDXL's block structure (Down, CrossAttnDown / CrossAttnUp, Up; 2 layers per block,
# text_time conditioning) at toy width, and two tiny CLIP text encoders.
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32), layers_per_block=2, cross_attention_dim=24, transformer_layers_per_block=(1, 1),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 16, norm_num_groups=8,
)
TINY_CLIP = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                 max_position_embeddings=8, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
TINY_CLIP_2 = dict(TINY_CLIP, hidden_size=16, intermediate_size=32, projection_dim=16)
TINY_FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=8, guidance_embeds=False,
                 axes_dims_rope=(2, 2, 4))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def lora_factors(shape: tuple[int, ...], rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya-shaped (down, up): down (r, in[, kh, kw]), up (out, r[, 1, 1])."""
    out, rest = shape[0], shape[1:]
    down = randn(rank, *rest, g=g, scale=1 / math.sqrt(max(1, math.prod(rest))))
    up = randn(out, rank, *([1] * (len(shape) - 2)), g=g, scale=0.5)
    return down, up


def kohya_module(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> dict[str, torch.Tensor]:
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def ref_lora(down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """ΔW of a kohya LoRA module: (alpha/r)·up@down, missing alpha = rank; shape (out, in[, kh, kw])."""
    r = down.shape[0]
    scale = 1.0 if alpha is None else alpha / r
    delta = up.double().flatten(1) @ down.double().flatten(1)
    return (scale * delta).reshape(up.shape[0], *down.shape[1:])


def ref_tucker_locon(down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """LoCon-Tucker: apply down (1×1), mid (k×k), up (1×1) as a composed conv kernel."""
    r = down.shape[0]
    w = torch.einsum("oi,ijkl,jc->ockl", up.double()[:, :, 0, 0], mid.double(), down.double()[:, :, 0, 0])
    return alpha / r * w


def ref_loha(w1a, w1b, w2a, w2b, alpha, shape, t1=None, t2=None) -> torch.Tensor:
    if t1 is None:
        w1 = (w1a.double() @ w1b.double()).reshape(shape)
        w2 = (w2a.double() @ w2b.double()).reshape(shape)
    else:
        w1 = torch.einsum("ijkl,ip,jr->prkl", t1.double(), w1a.double(), w1b.double())
        w2 = torch.einsum("ijkl,ip,jr->prkl", t2.double(), w2a.double(), w2b.double())
    return alpha / w1b.shape[0] * w1 * w2


def ref_lokr(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """kron(w1, w2) with w1 given trailing singleton dims for a 4-D w2 (how LyCORIS builds conv LoKr)."""
    w1 = w1.double().reshape(*w1.shape, *([1] * (w2.ndim - w1.ndim))).contiguous()
    return scale * torch.kron(w1, w2.double().contiguous())


def delta_of(lr) -> torch.Tensor:
    return lr.product(torch.float64)


def assert_delta(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal up to float32 rounding of the stored factors: error relative to the largest entry."""
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale)
