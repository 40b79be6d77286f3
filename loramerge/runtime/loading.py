"""Loading a base model (and its tokenizer) with transformers, once, onto the chosen device and dtype."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from loramerge.core.devices import parse_dtype, resolve_device
from loramerge.errors import UnsupportedModel
from loramerge.io.sources import resolve_model
from loramerge.io.structured import read_json
from loramerge.runtime.extra import require

ModelKind = Literal["causal", "seq2seq", "encoder"]


@dataclass
class LoadedModel:
    """A model ready to run: the module, its kind, its folder and its configuration as a dict."""

    model: nn.Module
    kind: ModelKind
    folder: Path
    config: dict[str, Any]


def model_kind(config: Any, architecture: str | None = None) -> ModelKind:
    """``causal``, ``seq2seq`` or ``encoder``: from the model class (``architecture``, else the config's
    ``architectures``), else from the model type (any ``AutoModelForCausalLM`` type is causal)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    names = [architecture] if architecture else list(getattr(config, "architectures", None) or [])
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if names:
        if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names) and not encoder_decoder:
            return "causal"
        return "seq2seq" if encoder_decoder else "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder_decoder:
        return "causal"
    if config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq"
    return "encoder"


def load_model(base: str | Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
               allow_pickle: bool = False) -> LoadedModel:
    """Load the transformers model at ``base`` (folder or Hub id) in evaluation mode, gradients off.

    The dtype is the checkpoint's own (``torch_dtype`` in its config) unless ``dtype`` is given;
    ``device="auto"`` is the GPU when there is one. Causal LMs load with
    ``AutoModelForCausalLM``, encoder-decoder LMs with ``AutoModelForSeq2SeqLM`` and other models
    with ``AutoModel``. Pickle checkpoints (``.bin``) load only with ``allow_pickle``.
    """
    transformers = require("transformers", what="loading a base model")
    folder = resolve_model(base)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UnsupportedModel(f"{folder}: no config.json; the runtime loads transformers model folders")
    model_type = read_json(config_file, error=UnsupportedModel).get("model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise UnsupportedModel(
            f"{folder}: model type {model_type!r} is not one transformers {transformers.__version__} can load; "
            "pass a torch module to Runtime(...) to run another kind of model"
        )
    config = transformers.AutoConfig.from_pretrained(folder)
    kind = model_kind(config)
    auto = {"causal": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "encoder": transformers.AutoModel}[kind]
    wanted = parse_dtype(dtype)
    dtype_key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_key: wanted if wanted is not None else "auto"}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        with _quiet_loading(transformers):
            model = auto.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (pass --allow-pickle to read .bin weights)" if not allow_pickle and "safetensors" in first.lower() else ""
        raise UnsupportedModel(f"{folder}: transformers could not load the {model_type} model: {first}{hint}") from None
    model = model.to(resolve_device(device)).eval().requires_grad_(False)
    return LoadedModel(model, kind, folder, config.to_dict())


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved with a model, or :class:`UnsupportedModel` naming the folder.

    A tokenizer without a pad token pads with its end-of-sequence token (the padding is masked).
    """
    transformers = require("transformers", what="tokenizing data")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModel(f"{folder}: no tokenizer could be loaded ({first}); evaluation data and --prompts "
                               "need the tokenizer files (tokenizer.json, tokenizer_config.json) beside the model") from None
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise UnsupportedModel(f"{folder}: no tokenizer files beside the model")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextmanager
def _quiet_loading(transformers: Any) -> Iterator[None]:
    """transformers' own "Loading weights" bar off: loading a model is one step of a command with its own bars."""
    logging = transformers.utils.logging
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _version(text: str) -> tuple[int, int]:
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in text.split(".")[:2]]
    return parts[0], parts[1] if len(parts) > 1 else 0
