"""fold into single-file SD 1.x / SDXL / Flux checkpoints (original key names, fused q/k/v slices).

The checkpoints are tiny diffusers/transformers models saved under their original names
(tests/sd_checkpoints.py, checked against diffusers' single-file converters). The kohya LoRAs are
written by hand on every Linear and Conv2d, with kohya's own spellings (SGM for the SDXL UNet,
diffusers-style for SD 1.x, BFL with fused qkv for Flux). Two references:

- by hand: ΔW added to the diffusers-named weights in float64, then renamed to the original names;
- diffusers itself: the pipeline loads the kohya file with ``load_lora_weights`` and fuses it;
  our folded file, read back with diffusers' single-file converters (``from_single_file`` for the
  UNet), must give the same weights and outputs.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from safetensors import safe_open

from loramerge import IncompatibleAdapters, InvalidParameter, OutputExists, fold, load
from loramerge.cli import main
from loramerge.io.checkpoint import read_header
from loramerge.io.formats.sd_names import ARCHITECTURES, SD1_UNET, SD2_UNET, SDXL_UNET, flatten, unet_modules
from loramerge.io.single_file import SingleFileResolver, infer_unet_spec
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.sd_checkpoints import (
    SD1_TE,
    SDXL_TE2,
    TINY_SD1_UNET,
    UNET,
    from_single_file_state,
    models,
    single_file_state,
    states,
    unet_ldm_name,
)
from tests.sd_fixtures import TINY_SDXL_UNET, gen, lora_factors, ref_lora

diffusers = pytest.importorskip("diffusers")
warnings.filterwarnings("ignore", message=".*torchvision.*")

KINDS = ("sd1", "sdxl", "flux")
_TE_PREFIX = {("sd1", "text_encoder"): "lora_te_", ("sdxl", "text_encoder"): "lora_te1_",
              ("sdxl", "text_encoder_2"): "lora_te2_"}
_FLUX_FUSED = {"attn.to_q": "qkv", "attn.add_q_proj": "qkv"}


# ------------------------------------------------------------------------------------------ builders


def kohya_name(kind: str, canonical: str) -> str:
    """kohya's spelling of a canonical module: SGM names for the SDXL UNet, diffusers-style for SD 1.x."""
    component, _, path = canonical.partition(".")
    if component == "unet":
        config = TINY_SDXL_UNET if kind == "sdxl" else TINY_SD1_UNET
        return "lora_unet_" + flatten(unet_ldm_name(path + ".weight", config)[: -len(".weight")] if kind == "sdxl" else path)
    return _TE_PREFIX[(kind, component)] + flatten(path)


def targets(components: dict[str, torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Every Linear and Conv2d of the models: canonical module name → weight shape."""
    out = {}
    for component, model in components.items():
        inner = "text_model." if component.startswith("text_encoder") and not hasattr(model, "text_model") else ""
        for path, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                out[f"{component}.{inner}{path}"] = tuple(module.weight.shape)
    return out


def kohya_lora(kind: str, components: dict[str, torch.nn.Module], seed: int, skip=lambda m: False,
               alphas: tuple[float | None, ...] = (2.0,)):
    """A hand-written kohya file's tensors, and ΔW per canonical module (float64, weight layout).

    Ranks cycle through 1–3 and alphas through ``alphas`` (None: no alpha tensor, alpha = rank).
    One common alpha is the default because diffusers misplaces per-module alphas on SD/SDXL
    attention layers when it loads a kohya file.
    """
    g = gen(seed)
    tensors, deltas = {}, {}
    shapes = targets(components)
    for i, (module, shape) in enumerate(shapes.items()):
        if skip(module) or (kind == "flux" and _flux_fused_part(module)):
            continue
        rank, alpha = 1 + i % 3, alphas[i % len(alphas)]
        name = kohya_name(kind, module) if kind != "flux" else _flux_kohya_name(module)
        if kind == "flux" and name.endswith(("_qkv", "_linear1")):
            parts = _flux_parts(module, shapes)
            shape = (sum(shapes[p][0] for p in parts), shape[1])
        down, up = lora_factors(shape, rank, g)
        up = up * 0.3
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
        delta = ref_lora(down, up, alpha)
        if kind == "flux" and name.endswith(("_qkv", "_linear1")):
            start = 0
            for part in _flux_parts(module, shapes):
                rows = shapes[part][0]
                deltas[part] = delta[start:start + rows]
                start += rows
        elif kind == "flux" and module == "transformer.norm_out.linear":
            shift, scale = delta.chunk(2)  # kohya's BFL rows are (shift, scale); diffusers' are (scale, shift)
            deltas[module] = torch.cat([scale, shift])
        else:
            deltas[module] = delta
    return tensors, deltas


def _flux_fused_part(module: str) -> bool:
    """True for the parts of a fused BFL weight other than its first (kohya names the whole by the first)."""
    rest = module.split(".", 3)[-1]
    if ".single_transformer_blocks." in module:
        return rest in ("attn.to_k", "attn.to_v", "proj_mlp")
    return rest in ("attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj")


def _flux_parts(module: str, shapes) -> list[str]:
    block = module.rsplit(".attn.", 1)[0]
    if ".single_transformer_blocks." in module:
        return [f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp"]
    if module.endswith("add_q_proj"):
        return [f"{block}.attn.add_{p}_proj" for p in "qkv"]
    return [f"{block}.attn.to_{p}" for p in "qkv"]


def _flux_kohya_name(module: str) -> str:
    """kohya's BFL spelling of a Flux module (fused qkv and linear1 named once, by their q part)."""
    from tests.sd_checkpoints import _FLUX_DOUBLE, _FLUX_SINGLE, _FLUX_TOP

    path = module.removeprefix("transformer.")
    if path in _FLUX_TOP:
        return "lora_unet_" + flatten(_FLUX_TOP[path])
    if path == "norm_out.linear":
        return "lora_unet_final_layer_adaLN_modulation_1"
    kind, i, rest = path.split(".", 2)
    if kind == "transformer_blocks":
        bfl = f"double_blocks.{i}"
        if rest in ("attn.to_q", "attn.add_q_proj"):
            return "lora_unet_" + flatten(f"{bfl}.{'img' if rest == 'attn.to_q' else 'txt'}_attn.qkv")
        return "lora_unet_" + flatten(f"{bfl}.{_FLUX_DOUBLE[rest]}")
    bfl = f"single_blocks.{i}"
    if rest == "attn.to_q":
        return "lora_unet_" + flatten(f"{bfl}.linear1")
    return "lora_unet_" + flatten(f"{bfl}.{_FLUX_SINGLE[rest]}")


def write_checkpoint(path, kind: str, components, dtype=torch.float32, metadata=None):
    state = {k: v.to(dtype).contiguous() for k, v in single_file_state(states(components), kind).items()}
    if kind != "flux":  # a VAE tensor that no LoRA touches, as real checkpoints carry
        state["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=gen(7)).to(dtype)
    safetensors.torch.save_file(state, str(path), metadata=metadata)
    return path


def expected_state(kind: str, components, deltas: dict[str, torch.Tensor], weight: float = 1.0):
    """The hand reference: ΔW added to the diffusers-named weights in float64, renamed to the original names."""
    canonical = states(components)
    for module, delta in deltas.items():
        key = f"{module}.weight"
        canonical[key] = canonical[key] + weight * delta.reshape(canonical[key].shape)
    return single_file_state(canonical, kind)


def read_all(path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def assert_state_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 2e-6) -> None:
    for name, value in expected.items():
        scale = float(value.abs().max()) or 1.0
        torch.testing.assert_close(got[name].double(), value.double(), rtol=rtol, atol=rtol * scale, msg=name)


@pytest.fixture(scope="module", params=KINDS)
def case(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    components = models(kind)
    base = write_checkpoint(root / f"{kind}.safetensors", kind, components,
                            metadata={"modelspec.title": f"tiny {kind}", "modelspec.hash_sha256": "0xdead"})
    tensors, deltas = kohya_lora(kind, components, seed=3)
    lora = root / "lora.safetensors"
    safetensors.torch.save_file(tensors, str(lora))
    out = root / "merged.safetensors"
    result = fold(base, lora, output=out)
    return kind, components, base, lora, deltas, out, result


# ---------------------------------------------------------------------------------- hand reference


def test_fold_matches_delta_added_by_hand_to_the_original_keys(case):
    kind, components, base, _, deltas, out, result = case
    got = read_all(out)
    expected = expected_state(kind, components, deltas)
    assert set(got) - set(expected) <= {"first_stage_model.decoder.conv_in.weight"}
    assert_state_close(got, expected)
    changed = {name for name in expected if not torch.equal(got[name], read_all(base)[name])}
    assert set(result.changed) == changed  # exactly the weights the LoRA touches
    assert result.modules == len(load(case[3]).layers)
    if kind == "sdxl":  # q, k and v of OpenCLIP-G land in row slices of one fused in_proj_weight
        assert f"{SDXL_TE2}transformer.resblocks.0.attn.in_proj_weight" in result.changed
        assert f"{SDXL_TE2}text_projection" in result.changed  # stored transposed
    if kind == "flux":
        assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                "final_layer.adaLN_modulation.1.weight"} <= set(result.changed)


def test_fold_keeps_names_order_dtypes_metadata_and_untouched_bytes(case):
    kind, _, base, _, _, out, result = case
    (ours, ours_meta), (theirs, _) = read_header(out), read_header(base)
    assert [(t.name, t.dtype, t.shape) for t in ours] == [(t.name, t.dtype, t.shape) for t in theirs]
    assert ours_meta["modelspec.title"] == f"tiny {kind}"
    assert "modelspec.hash_sha256" not in ours_meta  # a hash of the old bytes would now be false
    recipe = json.loads(ours_meta["loramerge"])
    assert recipe["command"] == "fold" and recipe["changed_tensors"] == sorted(result.changed)
    with open(out, "rb") as a, open(base, "rb") as b:
        for mine, orig in zip(ours, theirs):
            if mine.name not in result.changed:
                a.seek(mine.start)
                b.seek(orig.start)
                assert a.read(mine.nbytes) == b.read(orig.nbytes), mine.name


def test_half_precision_checkpoint_stays_half_and_rounds_once(tmp_path):
    components = models("sdxl")
    with torch.no_grad():  # weights fp16 can hold exactly, so the float64 reference starts from the stored values
        for model in components.values():
            for p in model.parameters():
                p.copy_(p.half().float())
    base = write_checkpoint(tmp_path / "fp16.safetensors", "sdxl", components, dtype=torch.float16)
    tensors, deltas = kohya_lora("sdxl", components, seed=4)
    safetensors.torch.save_file(tensors, str(tmp_path / "lora.safetensors"))
    fold(base, tmp_path / "lora.safetensors", output=tmp_path / "out.safetensors")
    got = read_all(tmp_path / "out.safetensors")
    assert {v.dtype for v in got.values()} == {torch.float16}
    for name, value in expected_state("sdxl", components, deltas).items():
        # One rounding to fp16: at most one unit in the last place away from the float64 value rounded.
        ulp = torch.finfo(torch.float16).eps * value.abs().clamp_min(2 ** -14)
        assert bool(((got[name].double() - value).abs() <= ulp).all()), name


# ------------------------------------------------------------------------------ diffusers as reference


def _pipeline(kind: str, components):
    parts = {k: copy.deepcopy(m) for k, m in components.items()}
    if kind == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=None, text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"], tokenizer=None,
            tokenizer_2=None, unet=parts["unet"], scheduler=diffusers.EulerDiscreteScheduler())
    return diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=parts["text_encoder"], tokenizer=None, unet=parts["unet"],
        scheduler=diffusers.EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _unet_output(unet, kind: str) -> torch.Tensor:
    g = gen(99)
    cross = unet.config.cross_attention_dim
    kwargs = {}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 16, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 5, cross, generator=g),
                    **kwargs).sample


def test_diffusers_fusing_the_lora_gives_what_from_single_file_reads_from_our_fold(case, tmp_path):
    kind, components, _, lora, _, out, _ = case
    if kind == "flux":
        pytest.skip("diffusers' Flux single-file and kohya-Flux converters hard-code Flux.1's widths")
    pipe = _pipeline(kind, components)
    pipe.load_lora_weights(str(lora))
    names = ["unet", "text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    pipe.fuse_lora(components=names)
    pipe.unload_lora_weights()
    ours = from_single_file_state(read_all(out), kind, components)
    for name in names:
        theirs = getattr(pipe, name).state_dict()
        mine = ours[name]
        for key, value in theirs.items():
            scale = float(value.abs().max()) or 1.0
            torch.testing.assert_close(mine[key].to(value.dtype), value, rtol=1e-5, atol=1e-5 * scale, msg=f"{name}.{key}")
    # The UNet as diffusers loads the single file, against the pipeline's fused UNet.
    config = tmp_path / "unet"
    components["unet"].save_config(config)
    unet = diffusers.UNet2DConditionModel.from_single_file(str(out), config=str(config), local_files_only=True)
    base = _unet_output(components["unet"], kind)
    expected = _unet_output(pipe.unet, kind)
    assert float((expected - base).abs().max()) > 1e-2 * float(base.abs().max())  # the LoRA matters
    torch.testing.assert_close(_unet_output(unet, kind), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


# ------------------------------------------------------------------------------ other adapter formats


def test_diffusers_and_lycoris_files_fold_like_the_kohya_file(case, tmp_path):
    kind, components, base, lora, _, out, _ = case
    adapter = load(lora)
    as_diffusers = adapter.save(tmp_path / "diffusers-lora", format="diffusers")
    fold(base, as_diffusers, output=tmp_path / "d.safetensors")
    assert_state_close(read_all(tmp_path / "d.safetensors"), read_all(out), rtol=1e-5)
    # A LyCORIS LoHa module (rank r₁·r₂ once expanded) on one attention projection, hand reference.
    module = {"sd1": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
              "sdxl": "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj",
              "flux": "transformer.transformer_blocks.0.attn.to_out.0"}[kind]
    name = kohya_name(kind, module) if kind != "flux" else _flux_kohya_name(module)
    shape = targets(components)[module]
    g = gen(11)
    w1a, w1b = torch.randn(shape[0], 2, generator=g), torch.randn(2, shape[1], generator=g)
    w2a, w2b = torch.randn(shape[0], 2, generator=g), torch.randn(2, shape[1], generator=g)
    safetensors.torch.save_file({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
                                 f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(1.0)}, str(tmp_path / "loha.safetensors"))
    assert load(tmp_path / "loha.safetensors").source_format == "lycoris"
    fold(base, tmp_path / "loha.safetensors", output=tmp_path / "l.safetensors")
    delta = 0.5 * (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double())
    assert_state_close(read_all(tmp_path / "l.safetensors"), expected_state(kind, components, {module: delta}))


def test_a_diffusers_named_lora_lands_in_fused_and_reordered_rows(case, tmp_path):
    """Written by hand with diffusers' split names: q/k/v go into rows of qkv / linear1 / in_proj, and
    Flux's norm_out (scale, shift) into BFL's (shift, scale)."""
    kind, components, base, _, _, _, _ = case
    modules = {"sd1": ["unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k"],
               "sdxl": ["text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj",
                        "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj"],
               "flux": ["transformer.norm_out.linear", "transformer.single_transformer_blocks.0.proj_mlp",
                        "transformer.transformer_blocks.0.attn.add_v_proj"]}[kind]
    g = gen(12)
    shapes = targets(components)
    tensors, deltas = {}, {}
    for module in modules:
        down, up = lora_factors(shapes[module], 2, g)  # no alpha: diffusers' scale 1
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = down, up
        deltas[module] = ref_lora(down, up, None)
    (tmp_path / "d").mkdir()
    safetensors.torch.save_file(tensors, str(tmp_path / "d" / "pytorch_lora_weights.safetensors"))
    assert load(tmp_path / "d").source_format == "diffusers"
    fold(base, tmp_path / "d", output=tmp_path / "out.safetensors")
    assert_state_close(read_all(tmp_path / "out.safetensors"), expected_state(kind, components, deltas))


def test_dora_on_a_fused_slice_and_on_the_input_axis(tmp_path):
    """DoRA (fold only): on CLIP-G's k_proj and v_proj the norms are those of their own rows inside
    in_proj_weight; an old-LyCORIS (1, in) magnitude normalises columns (of those rows only)."""
    components = models("sdxl")
    base = write_checkpoint(tmp_path / "base.safetensors", "sdxl", components)
    weights = states(components)
    g = gen(13)
    k, v = (f"text_encoder_2.text_model.encoder.layers.0.self_attn.{p}_proj" for p in "kv")
    fc = "text_encoder.text_model.encoder.layers.1.mlp.fc1"
    tensors, deltas = {}, {}
    for module, axis in ((k, 1), (v, 0), (fc, 0)):
        W = weights[f"{module}.weight"]
        down, up = lora_factors(tuple(W.shape), 2, g)
        V = W + ref_lora(down, up, None)
        norms = V.norm(dim=axis, keepdim=True)
        magnitude = norms * (1 + 0.2 * torch.rand(norms.shape, generator=g, dtype=torch.float64))
        name = kohya_name("sdxl", module)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.dora_scale": magnitude.float()})
        deltas[module] = magnitude.float().double() * V / norms - W
    safetensors.torch.save_file(tensors, str(tmp_path / "dora.safetensors"))
    fold(base, tmp_path / "dora.safetensors", output=tmp_path / "out.safetensors")
    assert_state_close(read_all(tmp_path / "out.safetensors"), expected_state("sdxl", components, deltas), rtol=1e-5)


def test_two_loras_fold_as_their_weighted_sum(tmp_path):
    components = models("sdxl")
    base = write_checkpoint(tmp_path / "base.safetensors", "sdxl", components)
    a, deltas_a = kohya_lora("sdxl", components, seed=5)
    b, deltas_b = kohya_lora("sdxl", components, seed=6, skip=lambda m: m.startswith("text_encoder."),
                             alphas=(None, 1.0, 4.0, 0.5))
    safetensors.torch.save_file(a, str(tmp_path / "a.safetensors"))
    safetensors.torch.save_file(b, str(tmp_path / "b.safetensors"))
    fold(base, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], weights=[0.7, -0.4],
         output=tmp_path / "out.safetensors")
    total = {m: 0.7 * d + (-0.4 * deltas_b[m] if m in deltas_b else 0) for m, d in deltas_a.items()}
    assert_state_close(read_all(tmp_path / "out.safetensors"), expected_state("sdxl", components, total))
    # An SVD merge at a rank that holds the sum (3 + 3) first merges, then folds: the same weights.
    fold(base, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], weights=[0.7, -0.4], method="svd", rank=6,
         output=tmp_path / "svd.safetensors")
    assert_state_close(read_all(tmp_path / "svd.safetensors"), expected_state("sdxl", components, total), rtol=1e-5)


# ------------------------------------------------------------------------------ diffusers pipeline folders

_PIPELINES = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}


def write_pipeline(folder, kind: str, components) -> None:
    """A diffusers pipeline folder as save_pretrained lays it out (model folders, a scheduler, model_index.json)."""
    index = {"_class_name": _PIPELINES[kind], "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    for name, model in components.items():
        model.save_pretrained(folder / name)
        library = "transformers" if name.startswith("text_encoder") else "diffusers"
        index[name] = [library, type(model).__name__]
    diffusers.EulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index))


def test_fold_into_a_diffusers_pipeline_folder(case, tmp_path):
    kind, components, _, lora, deltas, _, _ = case
    write_pipeline(tmp_path / "pipe", kind, components)
    result = fold(tmp_path / "pipe", lora, output=tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "scheduler" / "scheduler_config.json").is_file() and (out / "model_index.json").is_file()
    assert json.loads((out / "loramerge.json").read_text())["changed_tensors"] == result.changed
    expected = states(components)
    for module, delta in deltas.items():
        expected[f"{module}.weight"] = expected[f"{module}.weight"] + delta.reshape(expected[f"{module}.weight"].shape)
    for name, model in components.items():
        loaded = type(model).from_pretrained(out / name).eval()  # diffusers / transformers load the result
        mine = states({name: loaded})
        assert_state_close(mine, {k: v for k, v in expected.items() if k.startswith(name + ".")})
    assert len(result.changed) == sum(1 for k in expected if not torch.equal(expected[k], states(components)[k]))


def test_a_pipeline_component_nobody_touches_is_copied_byte_for_byte(tmp_path):
    components = models("sdxl")
    write_pipeline(tmp_path / "pipe", "sdxl", components)
    tensors, _ = kohya_lora("sdxl", components, seed=8, skip=lambda m: not m.startswith("unet."))
    safetensors.torch.save_file(tensors, str(tmp_path / "unet-only.safetensors"))
    fold(tmp_path / "pipe", tmp_path / "unet-only.safetensors", output=tmp_path / "out")
    for name in ("text_encoder", "text_encoder_2"):
        for file in (tmp_path / "pipe" / name).iterdir():
            assert (tmp_path / "out" / name / file.name).read_bytes() == file.read_bytes()
    # The UNet folder alone is a base too: the adapter's unet.… names are looked up inside it.
    fold(tmp_path / "pipe" / "unet", tmp_path / "unet-only.safetensors", output=tmp_path / "unet")
    weights = "diffusion_pytorch_model.safetensors"
    assert read_all(tmp_path / "unet" / weights).keys() == read_all(tmp_path / "out" / "unet" / weights).keys()
    assert all(torch.equal(v, read_all(tmp_path / "out" / "unet" / weights)[k])
               for k, v in read_all(tmp_path / "unet" / weights).items())
    sdxl_lora = tmp_path / "unet-only.safetensors"
    flux_pipe = tmp_path / "flux"
    write_pipeline(flux_pipe, "flux", models("flux"))
    with pytest.raises(IncompatibleAdapters, match=r"is a LoRA for SDXL, but .* is a diffusers FluxPipeline folder"):
        fold(flux_pipe, sdxl_lora, output=tmp_path / "bad")
    with pytest.raises(IncompatibleAdapters, match=r"module unet\..* belongs to no model of the pipeline"):
        fold(flux_pipe, sdxl_lora, output=tmp_path / "bad", ignore_base_mismatch=True)
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------ name inference


@pytest.mark.parametrize("spec", [SD1_UNET, SD2_UNET, SDXL_UNET], ids=["sd1", "sd2", "sdxl"])
def test_unet_structure_is_read_back_from_the_original_names(spec):
    fake = {f"{ldm}.weight": shape for _, ldm, shape in unet_modules(spec)}
    assert infer_unet_spec(fake) == spec


def test_real_sizes_resolve_every_table_module():
    for arch, container in (("sdxl", UNET), ("sd1", UNET)):
        table = ARCHITECTURES[arch]
        shapes = {f"{container}{o}.weight": table.shapes[c] for c, o in table.original.items() if c.startswith("unet.")}
        resolve = SingleFileResolver(shapes)
        for canonical, original in table.original.items():
            if canonical.startswith("unet."):
                assert [t.name for t in resolve(f"{canonical}.weight", shapes)] == [f"{container}{original}.weight"]


def test_other_single_file_layouts_resolve():
    """SD 2.x (OpenCLIP-H behind cond_stage_model.model.), a bare UNet file, and ComfyUI's bundled Flux
    (model.diffusion_model. + text_encoders.clip_l / t5xxl) — names only."""
    sd2 = {f"{UNET}{o}.weight": s for _, o, s in unet_modules(SD2_UNET)}
    sd2["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"] = (3072, 1024)
    sd2["cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight"] = (4096, 1024)
    resolve = SingleFileResolver(sd2)
    assert resolve.family == "sd2"
    v = resolve("text_encoder.text_model.encoder.layers.22.self_attn.v_proj.weight", sd2)
    assert (v.name, v.start, v.size) == ("cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight", 2048, 1024)
    assert resolve("text_encoder.text_model.encoder.layers.22.mlp.fc1.weight", sd2).endswith("mlp.c_fc.weight")
    assert [t.name for t in resolve("unet.mid_block.attentions.0.proj_in.weight", sd2)] == [f"{UNET}middle_block.1.proj_in.weight"]
    bare = {f"{o}.weight": s for _, o, s in unet_modules(SD1_UNET)}
    resolve = SingleFileResolver(bare)
    assert resolve.family is None  # no text encoder, no added embedding: SD 1.x or 2.x cannot be told
    assert [t.name for t in resolve("unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight", bare)] == [
        "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight"]
    flux = ARCHITECTURES["flux"]
    comfy = {f"{UNET}{o}.weight": flux.shapes[c] for c, o in flux.original.items()}
    comfy.update({f"{UNET}{o}.weight": flux.kohya[k].shape for k, o in flux.fused_original.items()})
    comfy["text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = (3072, 768)
    comfy["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"] = (4096, 4096)
    resolve = SingleFileResolver(comfy)
    assert resolve.family == "flux"
    mlp = resolve("transformer.single_transformer_blocks.37.proj_mlp.weight", comfy)
    assert [(t.name, t.start, t.size) for t in mlp] == [(f"{UNET}single_blocks.37.linear1.weight", 9216, 12288)]
    assert resolve("text_encoder.text_model.encoder.layers.0.mlp.fc1.weight", comfy).startswith("text_encoders.clip_l.")
    assert resolve("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.weight", comfy).startswith("text_encoders.t5xxl.")
    # A kohya name no table knows is matched against the flattened checkpoint names.
    assert resolve("lora_unet_double_blocks_0_img_attn_proj.weight", comfy) == f"{UNET}double_blocks.0.img_attn.proj.weight"


# ---------------------------------------------------------------------------------------- bad input


def test_missing_module_names_it_and_the_nearest_tensors(case, tmp_path):
    kind, _, base, _, _, _, _ = case
    if kind != "sd1":
        pytest.skip("one checkpoint is enough")
    # A LoRA on an attention the tiny SD 1.x UNet lacks (its second level has none).
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up = lora_factors((32, 32), 2, gen(1))
    safetensors.torch.save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up},
                                str(tmp_path / "x.safetensors"))
    with pytest.raises(IncompatibleAdapters, match=r"module unet\.down_blocks\.1\.attentions\.0\.transformer_blocks\.0"
                                                   r"\.attn1\.to_q not found in the base model.*nearest"):
        fold(base, tmp_path / "x.safetensors", output=tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_shape_mismatch_names_module_tensor_and_both_shapes(tmp_path):
    components = models("sdxl")
    base = write_checkpoint(tmp_path / "base.safetensors", "sdxl", components)
    # q_proj of CLIP-G is 16×16 here; a LoRA for 24×16 cannot be a slice of in_proj_weight.
    name = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    down, up = lora_factors((24, 16), 2, gen(2))
    safetensors.torch.save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up},
                                str(tmp_path / "x.safetensors"))
    with pytest.raises(IncompatibleAdapters, match=r"self_attn\.q_proj has a linear update of shape \(24, 16\) but its place "
                                                   r"in the base model holds 16 of its 24 rows: .*in_proj_weight of shape "
                                                   r"\(48, 16\) \(rows 0:16 for this module\)"):
        fold(base, tmp_path / "x.safetensors", output=tmp_path / "out.safetensors")
    name = "lora_unet_input_blocks_4_1_proj_in"
    down, up = lora_factors((32, 16), 2, gen(2))
    safetensors.torch.save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up},
                                str(tmp_path / "y.safetensors"))
    with pytest.raises(IncompatibleAdapters, match=r"proj_in has a linear update of shape \(32, 16\) but base tensor "
                                                   r"model\.diffusion_model\.input_blocks\.4\.1\.proj_in\.weight has shape \(32, 32\)"):
        fold(base, tmp_path / "y.safetensors", output=tmp_path / "out.safetensors")


def test_a_lora_for_another_architecture_is_refused(tmp_path):
    sdxl = write_checkpoint(tmp_path / "sdxl.safetensors", "sdxl", models("sdxl"))
    flux_components = models("flux")
    tensors, _ = kohya_lora("flux", flux_components, seed=1)
    safetensors.torch.save_file(tensors, str(tmp_path / "flux-lora.safetensors"))
    with pytest.raises(IncompatibleAdapters, match=r"is a LoRA for Flux\.1, but .*sdxl\.safetensors is a single-file SDXL checkpoint"):
        fold(sdxl, tmp_path / "flux-lora.safetensors", output=tmp_path / "out.safetensors")
    flux = write_checkpoint(tmp_path / "flux.safetensors", "flux", flux_components)
    sd1_tensors, _ = kohya_lora("sd1", models("sd1"), seed=1)
    safetensors.torch.save_file(sd1_tensors, str(tmp_path / "sd1-lora.safetensors"))
    with pytest.raises(IncompatibleAdapters, match=r"SD 1\.x.*but .*flux\.safetensors is a single-file Flux\.1 checkpoint"):
        fold(flux, tmp_path / "sd1-lora.safetensors", output=tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_existing_output_and_shard_size_are_refused(case, tmp_path):
    _, _, base, lora, _, _, _ = case
    (tmp_path / "out.safetensors").write_bytes(b"keep")
    with pytest.raises(OutputExists):
        fold(base, lora, output=tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep"
    with pytest.raises(InvalidParameter, match="single-file"):
        fold(base, lora, output=tmp_path / "o2.safetensors", shard_size="1MB")
    fold(base, lora, output=tmp_path / "out.safetensors", force=True)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as fh:
        assert "loramerge" in fh.metadata()


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_folds_a_kohya_lora_into_a_single_file(case, tmp_path):
    kind, _, base, lora, _, out, _ = case
    if kind != "sdxl":
        pytest.skip("one kind is enough")
    runner = CliRunner()
    target = tmp_path / "merged.safetensors"
    result = runner.invoke(main, ["fold", str(base), str(lora), "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    mine, theirs = read_all(target), read_all(out)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    result = runner.invoke(main, ["fold", str(base), str(lora), "-o", str(target)])
    assert result.exit_code == 1 and "error:" in result.output and "--force" in result.output
    assert "Traceback" not in result.output


def test_sd1_text_encoder_keys_keep_their_text_model_prefix(case):
    kind, _, _, _, _, out, result = case
    if kind != "sd1":
        pytest.skip("sd1 only")
    assert f"{SD1_TE}text_model.encoder.layers.0.self_attn.q_proj.weight" in result.changed
    assert math.isfinite(float(read_all(out)[f"{SD1_TE}text_model.encoder.layers.0.self_attn.q_proj.weight"].sum()))


def test_a_single_file_ckpt_base_is_read_only_with_allow_pickle(case, tmp_path):
    """An original ``.ckpt`` (weights under ``state_dict``, beside training state) folds like its safetensors twin,
    into a ``.safetensors`` file; without --allow-pickle it is refused by name."""
    kind, _, base, lora, _, out, _ = case
    ckpt = tmp_path / f"{kind}.ckpt"
    torch.save({"state_dict": read_all(base), "global_step": torch.tensor(7)}, str(ckpt))
    result = run_cli("fold", ckpt, lora, "-o", tmp_path / "refused.safetensors")
    assert_clean_failure(result, f"{kind}.ckpt", "--allow-pickle")
    assert not (tmp_path / "refused.safetensors").exists()
    fold(ckpt, lora, output=tmp_path / "from-ckpt.safetensors", allow_pickle=True)
    got, expected = read_all(tmp_path / "from-ckpt.safetensors"), read_all(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
