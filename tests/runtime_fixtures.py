"""Tiny transformers models saved with a real (character-level) tokenizer, for the runtime tests.

The tokenizer is built offline with the ``tokenizers`` library and wrapped in transformers'
``PreTrainedTokenizerFast``; it adds a BOS token and has a small chat template, so every row
type of the evaluation data can be tokenized.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " "


def char_tokenizer():
    """One token per character (letters, digits, punctuation, space), BOS prepended, EOS/PAD defined."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


VOCAB = len(SPECIALS) + len(CHARS)


def save_model(model, folder: Path, tokenizer=None) -> Path:
    """``save_pretrained`` of the model (safetensors) and, if given, the tokenizer, into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def random_ids(count: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIALS), vocab, (count, length), generator=g)


ROWS = {
    "add": [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (12, 30)]],
    "pick": [{"prompt": "Colour of the sky?", "choices": ["blue", "green", "red"], "answer": 0},
             {"prompt": "2+2=", "choices": ["4", "22"], "answer": 0},
             {"prompt": "Opposite of up:", "choices": ["left", "down"], "answer": 1}],
    "prose": [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Merging adapters, exactly."},
              {"text": "ok"}],
    "chat": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
             {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4"}]}],
}


def runtime_world(root: Path) -> dict:
    """A saved tiny Llama (float32, character tokenizer), three PEFT adapters and four data files.

    ``a`` and ``b`` share q_proj and differ elsewhere (so some modules belong to one source only);
    ``emb`` also adapts the input embedding.
    """
    from tests.fold_models import tiny_llama
    from tests.peft_fixtures import make_peft_adapter

    model = tiny_llama(vocab=VOCAB)
    base = save_model(model, root / "base", char_tokenizer())
    specs = {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"]),
        "emb": dict(r=3, lora_alpha=3, target_modules=["q_proj", "embed_tokens"]),
    }
    adapters = {name: make_peft_adapter(model, root / name, seed=i + 11, base_model_name=str(base), **kw)
                for i, (name, kw) in enumerate(specs.items())}
    data = {name: write_jsonl(root / "data" / f"{name}.jsonl", rows) for name, rows in ROWS.items()}
    return {"model": model, "base": base, "adapters": adapters, "data": data, "root": root}
