"""Tiny single-file SD 1.x, SDXL and Flux checkpoints, built from tiny diffusers/transformers models.

The diffusers → original (LDM/SGM, OpenCLIP, BFL) key conversions here are written from the
models' block arithmetic, independently of loramerge's name tables, and the SD ones are checked
against diffusers' own single-file converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``), which go the other way.
"""

from __future__ import annotations

import re

import torch

from tests.sd_fixtures import TINY_CLIP, TINY_CLIP_2, TINY_FLUX, TINY_SDXL_UNET

# SD 1.x's block structure (cross-attention down blocks then a plain one; 1×1 conv projections,
# no added embeddings) at toy width.
TINY_SD1_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32), layers_per_block=2, cross_attention_dim=8, attention_head_dim=2,
    use_linear_projection=False, norm_num_groups=8,
)
UNET = "model.diffusion_model."
SD1_TE = "cond_stage_model.transformer."
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0",
        "conv_out": "out.2"}


def models(kind: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The tiny diffusers components of ``sd1``, ``sdxl`` or ``flux``, seeded, norms made informative."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    if kind == "flux":
        out = {"transformer": diffusers.FluxTransformer2DModel(**TINY_FLUX)}
    else:
        out = {"unet": diffusers.UNet2DConditionModel(**(TINY_SDXL_UNET if kind == "sdxl" else TINY_SD1_UNET)),
               "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_CLIP))}
        if kind == "sdxl":
            out["text_encoder_2"] = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TINY_CLIP_2))
    with torch.no_grad():
        for model in out.values():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith(".bias"):
                    p.add_(0.1 * torch.randn_like(p))
    return {k: m.eval() for k, m in out.items()}


def states(components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter under its canonical name (``unet.…``, ``text_encoder.text_model.…``), float64."""
    out = {}
    for component, model in components.items():
        for key, value in model.state_dict().items():
            if component.startswith("text_encoder") and not key.startswith(("text_model.", "text_projection")):
                key = "text_model." + key
            out[f"{component}.{key}"] = value.detach().double()
    return out


# ----------------------------------------------------------------------------------------- UNet


def unet_ldm_name(key: str, config: dict) -> str:
    """The LDM name of a diffusers UNet2DConditionModel tensor (``down_blocks.1.resnets.0.conv1.weight``)."""
    layers = config["layers_per_block"]
    module, leaf = key.rsplit(".", 1)
    if module in _TOP:
        return f"{_TOP[module]}.{leaf}"
    up_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", module)
    if m:
        side, block, part, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            position = 1 + block * (layers + 1) + (layers if part == "downsamplers" else index)
            where = f"input_blocks.{position}"
        else:
            position = block * (layers + 1) + (layers if part == "upsamplers" else index)
            where = f"output_blocks.{position}"
        if part == "resnets":
            name, _, tail = rest.partition(".")
            return f"{where}.0.{_RESNET[name]}{'.' + tail if tail else ''}.{leaf}"
        if part == "attentions":
            return f"{where}.1.{rest}.{leaf}"
        if part == "downsamplers":
            return f"{where}.0.op.{leaf}"
        return f"{where}.{2 if up_attention[block] else 1}.conv.{leaf}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module)
    if m:
        part, index, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "attentions":
            return f"middle_block.1.{rest}.{leaf}"
        name, _, tail = rest.partition(".")
        return f"middle_block.{2 * index}.{_RESNET[name]}{'.' + tail if tail else ''}.{leaf}"
    raise KeyError(key)


# ---------------------------------------------------------------------------------- text encoders


def openclip_names(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An HF CLIPTextModelWithProjection state (``text_model.…``) in OpenCLIP names: fused in_proj, transposed projection."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key == "final_layer_norm.weight" or key == "final_layer_norm.bias":
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif m:
            layer, rest = m.groups()
            block = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
                leaf = rest.rsplit(".", 1)[1]
                if rest.startswith("self_attn.q_proj"):
                    parts = [state[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
                    out[f"{block}attn.in_proj_{leaf}"] = torch.cat(parts)
                continue
            rest = (rest.replace("self_attn.out_proj", "attn.out_proj").replace("mlp.fc1", "mlp.c_fc")
                    .replace("mlp.fc2", "mlp.c_proj").replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2"))
            out[block + rest] = value
        else:
            raise KeyError(key)
    return out


def single_file_state(canonical: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Canonical (diffusers-named) tensors of a tiny ``sd1``/``sdxl``/``flux`` model under original single-file names."""
    if kind == "flux":
        return {k: v for k, v in flux_bfl_names({k.removeprefix("transformer."): v for k, v in canonical.items()}).items()}
    config = TINY_SDXL_UNET if kind == "sdxl" else TINY_SD1_UNET
    out = {}
    for key, value in canonical.items():
        component, _, rest = key.partition(".")
        if component == "unet":
            out[UNET + unet_ldm_name(rest, config)] = value
        elif component == "text_encoder":
            out[(SDXL_TE1 if kind == "sdxl" else SD1_TE) + rest] = value
    if kind == "sdxl":
        te2 = {k.partition(".")[2]: v for k, v in canonical.items() if k.startswith("text_encoder_2.")}
        out.update(openclip_names(te2, SDXL_TE2))
    return out


def from_single_file_state(state: dict[str, torch.Tensor], kind: str, components: dict[str, torch.nn.Module]
                           ) -> dict[str, dict[str, torch.Tensor]]:
    """Back to each component's own state dict, with diffusers' single-file converters (SD) or :func:`flux_from_bfl`."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )

    if kind == "flux":
        return {"transformer": flux_from_bfl(state)}
    config = dict(components["unet"].config)
    out = {"unet": convert_ldm_unet_checkpoint(dict(state), config)}
    te = convert_ldm_clip_checkpoint(dict(state))
    if not hasattr(components["text_encoder"], "text_model"):
        te = {k.removeprefix("text_model."): v for k, v in te.items()}
    out["text_encoder"] = te
    if kind == "sdxl":
        out["text_encoder_2"] = convert_open_clip_checkpoint(components["text_encoder_2"], dict(state), prefix=SDXL_TE2)
    return out


# ---------------------------------------------------------------------------------------- Flux

_FLUX_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
_FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
                "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm"}
_FLUX_FUSED = {"img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
               "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
               "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]}


def _flux_leaf(module: str, leaf: str) -> str:
    return "scale" if "norm." in module and "_norm" in module else leaf  # RMSNorm weights are BFL "scale"


def flux_bfl_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state in BFL names: fused qkv / linear1, (shift, scale) final modulation."""
    out = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if module in _FLUX_TOP:
            out[f"{_FLUX_TOP[module]}.{leaf}"] = value
        elif module == "norm_out.linear":
            scale, shift = value.chunk(2)
            out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
        elif m := re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module):
            kind, i, rest = m.groups()
            bfl, renames = (f"double_blocks.{i}", _FLUX_DOUBLE) if kind == "transformer_blocks" else (f"single_blocks.{i}", _FLUX_SINGLE)
            if rest in renames:
                out[f"{bfl}.{renames[rest]}.{_flux_leaf(renames[rest], leaf)}"] = value
                continue
            fused = [f for f, parts in _FLUX_FUSED.items() if rest == parts[0] and (f == "linear1") == (kind != "transformer_blocks")]
            if fused:
                out[f"{bfl}.{fused[0]}.{leaf}"] = torch.cat([state[f"{kind}.{i}.{p}.{leaf}"] for p in _FLUX_FUSED[fused[0]]])
            elif not any(rest in parts for parts in _FLUX_FUSED.values()):
                raise KeyError(key)
        else:
            raise KeyError(key)
    return out


def flux_from_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flux_bfl_names`, as diffusers' convert_flux_transformer_checkpoint_to_diffusers
    does it, with the widths taken from the tensors (diffusers hard-codes Flux.1's 3072)."""
    state = {k.removeprefix(UNET): v for k, v in state.items()}
    hidden = state["img_in.weight"].shape[0]
    top = {v: k for k, v in _FLUX_TOP.items()}
    out = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if module in top:
            out[f"{top[module]}.{leaf}"] = value
        elif module == "final_layer.adaLN_modulation.1":
            shift, scale = value.chunk(2)
            out[f"norm_out.linear.{leaf}"] = torch.cat([scale, shift])
        elif m := re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", module):
            kind, i, rest = m.groups()
            block, renames = (f"transformer_blocks.{i}", _FLUX_DOUBLE) if kind == "double" else (f"single_transformer_blocks.{i}", _FLUX_SINGLE)
            inverse = {v: k for k, v in renames.items()}
            if rest in inverse:
                out[f"{block}.{inverse[rest]}.{'weight' if leaf == 'scale' else leaf}"] = value
            elif rest in _FLUX_FUSED:
                sizes = [hidden] * 3 + ([value.shape[0] - 3 * hidden] if rest == "linear1" else [])
                for part, chunk in zip(_FLUX_FUSED[rest], value.split(sizes)):
                    out[f"{block}.{part}.{leaf}"] = chunk
            else:
                raise KeyError(key)
        else:
            raise KeyError(key)
    return out
