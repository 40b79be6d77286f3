"""--push-to-hub on fold, extract and convert, and fold recipes that push: the real huggingface_hub
client against the local test Hub, with the model cards parsed by huggingface_hub.ModelCard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

import loramerge
from loramerge.cli import main
from loramerge.demo import build_demo_files
from loramerge.errors import HubError
from loramerge.io.checkpoint import open_checkpoint
from loramerge.recipe.model import RECIPE_FILENAME as RECIPE
from tests.hubserver import FakeHub, configure_client, reset_client
from tests.test_formats_cli import kohya_file

TOKEN = "hf_writetokenABCDEFGHIJKLMNOP123"
BASE_CARD = b"---\nlicense: apache-2.0\n---\n# Tiny base model\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    build_demo_files(root)
    (root / "base-model" / "README.md").write_bytes(BASE_CARD)  # the base's own card, which fold copies
    return root


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = FakeHub().start()
    server.tokens[TOKEN] = True
    configure_client(monkeypatch, server.url, str(tmp_path / "hf-home"))
    yield server
    server.stop()
    reset_client()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def on_hub(hub, demo):
    """The demo base model as ``org/tiny-llama`` and the math adapter as ``org/math-lora``, both apache-2.0."""
    hub.create_repo("org/tiny-llama")
    base_commit = hub.commit("org/tiny-llama", folder_files(demo / "base-model"))
    hub.create_repo("org/math-lora")
    math_commit = hub.commit("org/math-lora", {**folder_files(demo / "adapters" / "math"), "README.md": BASE_CARD})
    return {"base": base_commit, "math": math_commit}


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def pushed(hub: FakeHub, repo_id: str) -> dict[str, bytes]:
    repo = hub.repos[repo_id]
    return repo.commits[repo.refs["main"]]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    try:
        return {name: ckpt.read(name) for name in ckpt.tensors}
    finally:
        ckpt.release()


def test_fold_pushes_the_model_with_a_card_and_a_recipe_that_reproduces_it(hub, on_hub, demo, tmp_path,
                                                                          monkeypatch):
    code_adapter = tmp_path / "code"
    shutil.copytree(demo / "adapters" / "code", code_adapter)
    (code_adapter / "README.md").write_bytes(BASE_CARD)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "folded"
    code, text = cli("fold", "org/tiny-llama", "org/math-lora", code_adapter, "-o", out, "--weights", "0.7,0.3",
                     "--push-to-hub", "me/folded", "--private", "--commit-message", "fold math and code")
    assert code == 0, text
    assert "pushed to me/folded" in text and TOKEN not in text
    repo = hub.repos["me/folded"]
    files = pushed(hub, "me/folded")
    assert repo.private
    assert {"config.json", "model.safetensors", "loramerge.json", "README.md", RECIPE} <= set(files)
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert (out / "README.md").read_bytes() == BASE_CARD  # the local folder is left as fold wrote it
    record = json.loads(files["loramerge.json"])  # the pushed copy names no local directory
    assert record["base"]["source"] == f"org/tiny-llama@{on_hub['base']}"
    assert record["adapters"][1]["source"] == f"{tmp_path.name}/code" and str(tmp_path) not in files["loramerge.json"].decode()
    assert str(tmp_path) in (out / "loramerge.json").read_text()

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "org/tiny-llama"
    assert card.data.license == "apache-2.0"  # the base and both adapters declare it
    assert card.data.pipeline_tag == "text-generation"
    assert {"loramerge", "lora-fold", "merge", "linear"} <= set(card.data.tags)
    assert on_hub["base"] in card.text and on_hub["math"] in card.text  # resolved commits
    assert 'AutoModelForCausalLM.from_pretrained("me/folded")' in card.text

    recipe = yaml.safe_load(files[RECIPE])
    assert recipe["base_model"] == f"org/tiny-llama@{on_hub['base']}"
    assert recipe["sources"][0] == {"repo": "org/math-lora", "revision": on_hub["math"], "weight": 0.7}
    assert recipe["sources"][1] == {"path": "../code", "weight": 0.3}
    (out / RECIPE).write_bytes(files[RECIPE])  # beside the output, where its relative paths start
    hub.commit("org/tiny-llama", {"model.safetensors": b"moved on"})  # main moves; the pins do not
    again = tmp_path / "again"
    code, text = cli("run", out / RECIPE, "-o", again)
    assert code == 0, text
    first, second = tensors(out), tensors(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_fold_with_a_method_records_it_in_the_card(hub, demo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "svd"
    code, text = cli("fold", demo / "base-model", demo / "adapters" / "math", demo / "adapters" / "style", "-o", out,
                     "--method", "svd", "--rank", "4", "--dtype", "bf16", "--push-to-hub", "me/svd-folded")
    assert code == 0, text
    files = pushed(hub, "me/svd-folded")
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "loramerge-demo/tiny-llama"  # config.json's _name_or_path
    assert card.data.license is None  # the adapters declare none
    assert "svd" in card.data.tags and "merged by the `svd` method" in card.text
    assert "worst relative error" in card.text and "stored dtype: bf16" in card.text
    recipe = yaml.safe_load(files[RECIPE])
    assert recipe["method"] == "svd" and recipe["rank"] == 4 and recipe["output"] == {"dtype": "bf16"}


def test_extract_pushes_an_adapter_with_its_extraction_report(hub, demo, tmp_path, monkeypatch):
    folded = tmp_path / "folded"
    loramerge.fold(demo / "base-model", demo / "adapters" / "math", output=folded)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "extracted"
    code, text = cli("extract", demo / "base-model", folded, "-o", out, "--rank", "8", "--push-to-hub", "me/extracted")
    assert code == 0, text
    files = pushed(hub, "me/extracted")
    assert {"adapter_config.json", "adapter_model.safetensors", "loramerge.json", "README.md"} <= set(files)
    assert json.loads(files["loramerge.json"])["finetuned"] == f"{tmp_path.name}/folded"
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft"
    assert card.data.base_model == "loramerge-demo/tiny-llama"
    assert {"lora", "loramerge", "lora-extraction", "base_model:adapter:loramerge-demo/tiny-llama"} <= set(card.data.tags)
    assert 'PeftModel.from_pretrained(base, "me/extracted")' in card.text
    assert "model.layers.*.mlp.gate_proj" in card.text and "energy kept" in card.text
    back = loramerge.load("me/extracted")
    math = loramerge.load(demo / "adapters" / "math")
    assert set(back.modules) == set(math.modules)
    for module in math.modules:  # a rank-8 update extracted at rank 8 comes back whole
        assert torch.allclose(back.delta(module), math.delta(module), atol=1e-5), module


def test_convert_pushes_with_a_card_for_the_output_format(hub, tmp_path, monkeypatch):
    source = kohya_file(tmp_path / "pixel.safetensors", 3)
    hub.create_repo("org/sd-loras")
    commit = hub.commit("org/sd-loras", {"pixel.safetensors": source.read_bytes(),
                                         "README.md": b"---\nlicense: mit\n---\n"})
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, text = cli("convert", "org/sd-loras/pixel.safetensors", "-o", tmp_path / "diff", "--to", "diffusers",
                     "--push-to-hub", "me/pixel")
    assert code == 0, text
    files = pushed(hub, "me/pixel")
    assert sorted(files) == [".gitattributes", "README.md", "pytorch_lora_weights.safetensors"]
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "diffusers" and card.data.license == "mit"
    assert commit in card.text and "kohya format" in card.text
    assert 'pipe.load_lora_weights("me/pixel")' in card.text
    original, back = loramerge.load(source), loramerge.load("me/pixel")
    assert set(back.modules) == set(original.modules)
    assert all(torch.allclose(back.delta(m), original.delta(m), atol=1e-5) for m in original.modules)

    code, text = cli("convert", "org/sd-loras/pixel.safetensors", "-o", tmp_path / "x.safetensors", "--to", "peft",
                     "--push-to-hub", "me/pixel-peft")
    assert code == 0, text
    card = ModelCard(pushed(hub, "me/pixel-peft")["README.md"].decode())
    assert card.data.library_name == "peft"


@pytest.mark.parametrize("command", ["fold", "extract", "convert", "run"])
def test_push_without_credentials_fails_before_any_work(hub, demo, tmp_path, command):
    out = tmp_path / "out"
    recipe = tmp_path / "fold.yaml"
    recipe.write_text(f"base_model: {demo / 'base-model'}\nsources: [{demo / 'adapters' / 'math'}]\n")
    args = {
        "fold": ["fold", demo / "base-model", demo / "adapters" / "math", "-o", out],
        "extract": ["extract", demo / "base-model", demo / "base-model", "-o", out],
        "convert": ["convert", demo / "adapters" / "math", "-o", out],
        "run": ["run", recipe, "-o", out],
    }[command]
    hub.log.clear()
    code, text = cli(*args, "--push-to-hub", "me/x")
    assert code == 1, text
    assert text.startswith("error: me/x: pushing needs a token") and "Traceback" not in text
    assert not out.exists() and hub.log == []


def test_fold_recipe_that_only_pushes_writes_nothing_locally(hub, on_hub, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    recipe = work / "fold.yaml"
    recipe.write_text(
        "description: Math folded into the tiny Llama.\n"
        "base_model: org/tiny-llama\n"
        "sources:\n  - repo: org/math-lora\n    weight: 0.5\n"
        "output:\n  dtype: bf16\n  push: {repo: me/from-recipe, commit_message: recipe fold}\n"
    )
    hub.log.clear()
    with pytest.raises(HubError, match="pushing needs a token"):
        loramerge.run_recipe(recipe)
    assert hub.log == []  # refused before the sources were fetched
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = loramerge.run_recipe(recipe)
    assert [p.name for p in work.iterdir()] == ["fold.yaml"]
    assert result.changed
    files = pushed(hub, "me/from-recipe")
    assert {"config.json", "model.safetensors", "README.md", RECIPE, "loramerge.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "org/tiny-llama" and card.data.license == "apache-2.0"
    assert "Math folded into the tiny Llama." in card.text and "-o folded" in card.text
    saved = yaml.safe_load(files[RECIPE])
    assert saved["base_model"] == f"org/tiny-llama@{on_hub['base']}"
    assert saved["output"] == {"dtype": "bf16"} and "push" not in saved["output"]


def test_python_api_and_push_command_give_fold_and_extract_outputs_their_cards(hub, demo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folded = loramerge.fold(demo / "base-model", [demo / "adapters" / "code"], output=tmp_path / "folded")
    result = loramerge.push_to_hub(folded, "me/api-folded", description="Folded from Python.")
    files = hub.repos["me/api-folded"].commits[result.commit]
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and "lora-fold" in card.data.tags
    assert "Folded from Python." in card.text
    assert files["README.md"] != BASE_CARD and (tmp_path / "folded" / "README.md").read_bytes() == BASE_CARD

    code, text = cli("push", tmp_path / "folded", "me/cli-folded")
    assert code == 0, text
    assert ModelCard(pushed(hub, "me/cli-folded")["README.md"].decode()).data.library_name == "transformers"

    extracted = loramerge.extract(demo / "base-model", tmp_path / "folded", output=tmp_path / "lora", rank=4)
    result = loramerge.push_to_hub(extracted, "me/api-lora")
    card = ModelCard(hub.repos["me/api-lora"].commits[result.commit]["README.md"].decode())
    assert card.data.library_name == "peft" and "lora-extraction" in card.data.tags

    adapter = loramerge.load(demo / "adapters" / "style")
    result = loramerge.push_to_hub(adapter, "me/api-adapter")
    assert "adapter_model.safetensors" in hub.repos["me/api-adapter"].commits[result.commit]


def test_single_file_fold_pushes_the_file_with_a_diffusers_card(hub, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from tests.sd_checkpoints import models
    from tests.test_fold_sd import kohya_lora, write_checkpoint

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    components = models("sd1")
    write_checkpoint(tmp_path / "sd1.safetensors", "sd1", components)
    base = tmp_path / "sd1.safetensors"
    lora, _ = kohya_lora("sd1", components, seed=3)
    lora_path = tmp_path / "style.safetensors"
    safetensors.torch.save_file(lora, str(lora_path))
    out = tmp_path / "sd1-style.safetensors"
    code, text = cli("fold", base, lora_path, "-o", out, "--push-to-hub", "me/sd1-style")
    assert code == 0, text
    files = pushed(hub, "me/sd1-style")
    assert files["sd1-style.safetensors"] == out.read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "diffusers"
    assert "lora-fold" in card.data.tags and "## Base model" in card.text
    # Pushing the written file again later reads the fold's record from the file's own metadata.
    code, text = cli("push", out, "me/sd1-style-again")
    assert code == 0, text
    again = ModelCard(pushed(hub, "me/sd1-style-again")["README.md"].decode())
    assert again.data.library_name == "diffusers" and "lora-fold" in again.data.tags
    assert "## Base model" in again.text
