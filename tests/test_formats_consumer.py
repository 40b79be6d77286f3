"""The real consumer: diffusers loads our kohya and diffusers outputs with ``pipeline.load_lora_weights``.

Tiny SDXL and Flux pipelines are built from configs (no download; the VAE and tokenizers are not
needed to load LoRAs and are left out). For each output, the UNet/transformer and text-encoder
outputs with the LoRA loaded must equal those of a copy whose weights we patched by hand with
ΔW from our canonical adapter.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from loramerge import Adapter, LowRank, convert, load
from tests.sd_fixtures import TINY_CLIP, TINY_CLIP_2, TINY_FLUX, TINY_SDXL_UNET, gen

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

warnings.filterwarnings("ignore", message=".*torchvision.*")


def _random_adapter(models: dict[str, torch.nn.Module], seed: int, skip=lambda path: False) -> Adapter:
    """A LoRA on every Linear and Conv2d of ``models`` (ranks 1–3, assorted scales), canonical names."""
    g = gen(seed)
    layers = {}
    for component, model in models.items():
        inner = "text_model." if component.startswith("text_encoder") and not hasattr(model, "text_model") else ""
        for path, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or skip(f"{component}.{path}"):
                continue
            shape = tuple(module.weight.shape)
            rank = 1 + len(layers) % 3
            A = torch.randn(rank, *shape[1:], generator=g) / shape[1] ** 0.5
            B = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=g) * 0.3
            layers[f"{component}.{inner}{path}"] = LowRank(A=A, B=B, scale=(0.5, 1.0, 2.0)[len(layers) % 3],
                                                          kind="conv" if len(shape) == 4 else "linear")
    return Adapter(layers)


def _fold(models: dict[str, torch.nn.Module], adapter: Adapter) -> dict[str, torch.nn.Module]:
    folded = {c: copy.deepcopy(m) for c, m in models.items()}
    with torch.no_grad():
        for name, lr in adapter.layers.items():
            component, path = name.split(".", 1)
            model = folded[component]
            if component.startswith("text_encoder") and not hasattr(model, "text_model"):
                path = path.removeprefix("text_model.")
            weight = model.get_submodule(path).weight
            weight += lr.base_delta(torch.float64).reshape(weight.shape).to(weight.dtype)
    return folded


def _lora_modules(model: torch.nn.Module) -> int:
    return sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


# -- SDXL ---------------------------------------------------------------------------------------


def _sdxl_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_SDXL_UNET)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_CLIP))
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TINY_CLIP_2))
    return diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=te, text_encoder_2=te2, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(),
    )


def _sdxl_outputs(unet, te, te2) -> list[torch.Tensor]:
    g = gen(99)
    ids = torch.randint(2, 60, (1, 6), generator=g)
    with torch.no_grad():
        sample = unet(
            torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 5, 24, generator=g),
            added_cond_kwargs={"text_embeds": torch.randn(1, 16, generator=g), "time_ids": torch.randn(1, 6, generator=g)},
        ).sample
        return [sample, te(ids).last_hidden_state, te2(ids).text_embeds]


@pytest.fixture(scope="module")
def sdxl_case():
    pipe = _sdxl_pipeline()
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    adapter = _random_adapter(models, seed=1)
    folded = _fold(models, adapter)
    return adapter, _sdxl_outputs(folded["unet"], folded["text_encoder"], folded["text_encoder_2"]), \
        _sdxl_outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_sdxl_pipeline_loads_our_output_like_folding_by_hand(tmp_path, sdxl_case, fmt):
    adapter, expected, base = sdxl_case
    path = adapter.save(tmp_path / ("lora.safetensors" if fmt == "kohya" else "lora"), format=fmt)
    pipe = _sdxl_pipeline()
    pipe.load_lora_weights(str(path))
    counts = {c: sum(1 for m in adapter.modules if m.startswith(c + ".")) for c in ("unet", "text_encoder", "text_encoder_2")}
    assert _lora_modules(pipe.unet) == counts["unet"]
    assert _lora_modules(pipe.text_encoder) == counts["text_encoder"]
    assert _lora_modules(pipe.text_encoder_2) == counts["text_encoder_2"]
    got = _sdxl_outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    for g_out, e_out, b_out in zip(got, expected, base):
        assert float((e_out - b_out).abs().max()) > 1e-2 * float(b_out.abs().max())  # the LoRA matters
        _close(g_out, e_out)


def test_diffusers_loads_a_loha_file_converted_to_kohya(tmp_path):
    """LyCORIS LoHa in, kohya LoCon out: diffusers (which cannot read LoHa) loads the exact expansion."""
    import safetensors.torch

    pipe = _sdxl_pipeline()
    g = gen(5)
    module = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # unet.down_blocks.1.attentions.0…attn2.to_k
    weight = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
    out, inp = weight.shape
    tensors = {f"{module}.hada_w1_a": torch.randn(out, 2, generator=g), f"{module}.hada_w1_b": torch.randn(2, inp, generator=g),
               f"{module}.hada_w2_a": torch.randn(out, 2, generator=g), f"{module}.hada_w2_b": torch.randn(2, inp, generator=g),
               f"{module}.alpha": torch.tensor(1.0)}
    safetensors.torch.save_file(tensors, str(tmp_path / "loha.safetensors"))
    kohya = convert(tmp_path / "loha.safetensors", tmp_path / "locon.safetensors", to="kohya")
    expected = weight.detach().double() + 0.5 * (tensors[f"{module}.hada_w1_a"].double() @ tensors[f"{module}.hada_w1_b"].double()) * (
        tensors[f"{module}.hada_w2_a"].double() @ tensors[f"{module}.hada_w2_b"].double())
    pipe.load_lora_weights(str(kohya))
    pipe.fuse_lora(components=["unet"])
    torch.testing.assert_close(weight.detach().double(), expected, rtol=1e-5, atol=1e-5)


# -- Flux ---------------------------------------------------------------------------------------


def _flux_pipeline():
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(**TINY_FLUX)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_CLIP))
    t5 = transformers.T5EncoderModel(transformers.T5Config(d_model=12, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                                           vocab_size=64, feed_forward_proj="gated-gelu"))
    return diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=te,
                                  tokenizer=None, text_encoder_2=t5, tokenizer_2=None, transformer=transformer)


def _flux_outputs(transformer, te) -> list[torch.Tensor]:
    g = gen(98)
    with torch.no_grad():
        sample = transformer(
            hidden_states=torch.randn(1, 6, 4, generator=g), encoder_hidden_states=torch.randn(1, 3, 12, generator=g),
            pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([0.5]),
            img_ids=torch.randn(6, 3, generator=g), txt_ids=torch.zeros(3, 3), return_dict=False,
        )[0]
        return [sample, te(torch.randint(2, 60, (1, 6), generator=g)).last_hidden_state]


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_flux_pipeline_loads_our_output_like_folding_by_hand(tmp_path, fmt):
    pipe = _flux_pipeline()
    models = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    # diffusers' kohya-Flux converter hard-codes Flux.1's single-block widths (3072/12288), so at toy
    # width the kohya output leaves out the fused single-block q/k/v/mlp; and the converter drops the
    # prefix of the embedders and final layers (x_embedder, norm_out, ...), which it then does not
    # load. Their names are checked against that converter in test_formats_sd_names.py.
    def skip(name: str) -> bool:
        fused_single = ".single_transformer_blocks.0.attn." in name or name.endswith(".proj_mlp")
        top_level = name.startswith("transformer.") and "blocks" not in name
        return fmt == "kohya" and (fused_single or top_level)

    adapter = _random_adapter(models, seed=2, skip=skip)
    folded = _fold(models, adapter)
    expected = _flux_outputs(folded["transformer"], folded["text_encoder"])
    base = _flux_outputs(pipe.transformer, pipe.text_encoder)
    path = adapter.save(tmp_path / ("lora.safetensors" if fmt == "kohya" else "lora"), format=fmt)
    if fmt == "kohya":
        import safetensors.torch

        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in safetensors.torch.load_file(str(path))
    pipe.load_lora_weights(str(path))
    assert _lora_modules(pipe.transformer) == sum(1 for m in adapter.modules if m.startswith("transformer."))
    for g_out, e_out, b_out in zip(_flux_outputs(pipe.transformer, pipe.text_encoder), expected, base):
        assert float((e_out - b_out).abs().max()) > 1e-2 * float(b_out.abs().max())
        _close(g_out, e_out)


def test_a_lora_saved_by_diffusers_reads_back_with_the_same_deltas(tmp_path, sdxl_case):
    """diffusers as the producer: load our file, save it with save_lora_weights, read that back."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    adapter, _, _ = sdxl_case
    pipe = _sdxl_pipeline()
    pipe.load_lora_weights(str(adapter.save(tmp_path / "ours", format="diffusers")), adapter_name="ours")
    layers = {f"{c}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(pipe, c), adapter_name="ours"))
              for c in ("unet", "text_encoder", "text_encoder_2")}
    diffusers.StableDiffusionXLPipeline.save_lora_weights(str(tmp_path / "theirs"), **layers)
    theirs = load(tmp_path / "theirs")
    assert theirs.source_format == "diffusers" and sorted(theirs.modules) == sorted(adapter.modules)
    for m in adapter.modules:
        torch.testing.assert_close(theirs[m].product(torch.float64), adapter[m].product(torch.float64), rtol=1e-5, atol=1e-6)
