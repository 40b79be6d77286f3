"""Hub sources, pushes and model cards, through the real huggingface_hub client against a local server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import loramerge
from loramerge import Adapter, LowRank
from loramerge.cli import main
from loramerge.errors import HubError, SourceNotFound
from loramerge.hub.publish import publish_output
from loramerge.io.hub import HubRef, fetch_model, parse_hub_id
from loramerge.recipe.model import RECIPE_FILENAME as RECIPE
from tests.hubserver import FakeHub, client_env, configure_client, reset_client

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_writetokenABCDEFGHIJKLMNOP123"
READ_TOKEN = "hf_readtokenABCDEFGHIJKLMNOP456"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = FakeHub().start()
    server.tokens.update({TOKEN: True, READ_TOKEN: False})
    configure_client(monkeypatch, server.url, str(tmp_path / "hf-home"))
    yield server
    server.stop()
    reset_client()


def make_adapter(seed: int, base: str = "org/base") -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        {
            "model.layers.0.q_proj": LowRank(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 0.5),
            "model.layers.1.q_proj": LowRank(torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g), 2.0),
        },
        base_model=base, task_type="CAUSAL_LM",
    )


def adapter_files(adapter: Adapter, tmp_path: Path, name: str) -> dict[str, bytes]:
    folder = adapter.save(tmp_path / "src" / name)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def same_deltas(a: Adapter, b: Adapter) -> bool:
    return a.modules == b.modules and all(torch.allclose(a.delta(m), b.delta(m), atol=1e-6) for m in a.modules)


def fetched(server: FakeHub) -> list[str]:
    """The repository files the client downloaded (GET on /resolve/)."""
    return [path.split("/", 5)[5] for method, path, _ in server.log if method == "GET" and "/resolve/" in path]


@pytest.fixture
def published(hub, tmp_path):
    """``org/adapters``: v1 at the root (tagged), then v2 at the root and another adapter in ``extra/``."""
    v1, v2, extra = make_adapter(1), make_adapter(2), make_adapter(3)
    hub.create_repo("org/adapters")
    card = b"---\nlicense: apache-2.0\nbase_model: org/base\n---\n# adapters\n"
    first = hub.commit("org/adapters", {**adapter_files(v1, tmp_path, "v1"), "README.md": card})
    hub.tag("org/adapters", "v1", first)
    files = adapter_files(v2, tmp_path, "v2")
    second = hub.commit("org/adapters", {
        **files, **{f"extra/{k}": v for k, v in adapter_files(extra, tmp_path, "extra").items()},
        "training_args.bin": b"\x80pickle", "notes.txt": b"not an adapter file",
        "extra/deeper/adapter_model.safetensors": files["adapter_model.safetensors"],
    })
    return {"v1": v1, "v2": v2, "extra": extra, "first": first, "second": second}


# ---------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "expected"), [
    ("org/name", HubRef("org/name")),
    ("org/name@v1.0", HubRef("org/name", "v1.0")),
    ("org/name@refs/pr/3", HubRef("org/name", "refs/pr/3")),
    ("org/name/sub/folder", HubRef("org/name", None, "sub/folder")),
    ("org/name/sub@main", HubRef("org/name", "main", "sub")),
    ("org/name/lora.safetensors", HubRef("org/name", None, "lora.safetensors")),
    ("./org/name", None), ("/abs/path", None), ("name", None), ("~/x/y", None), ("org/../x", None),
    ("org/na me", None), ("C:\\x\\y", None),
])
def test_parse_hub_id(text, expected):
    assert parse_hub_id(text) == expected


def test_file_reference_is_detected():
    assert parse_hub_id("org/name/sub/lora.safetensors").is_file
    assert not parse_hub_id("org/name/sub").is_file


# ---------------------------------------------------------------------- downloads


def test_load_by_repo_id_downloads_only_the_adapter_files(hub, published):
    loaded = loramerge.load("org/adapters")
    assert same_deltas(loaded, published["v2"])
    assert loaded.source == "org/adapters"
    assert loaded.origin == {"repo_id": "org/adapters", "commit": published["second"], "license": "apache-2.0"}
    assert sorted(fetched(hub)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    snapshot = Path(os.environ["HF_HUB_CACHE"]) / "models--org--adapters" / "snapshots" / published["second"]
    assert sorted(p.name for p in snapshot.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_revision_tag_and_commit_hash(hub, published):
    by_tag = loramerge.load("org/adapters@v1")
    assert same_deltas(by_tag, published["v1"]) and not same_deltas(by_tag, published["v2"])
    assert by_tag.origin["commit"] == published["first"] and by_tag.origin["revision"] == "v1"
    by_hash = loramerge.load(f"org/adapters@{published['first']}")
    assert same_deltas(by_hash, published["v1"])


def test_subfolder_and_single_file(hub, published):
    sub = loramerge.load("org/adapters/extra")
    assert same_deltas(sub, published["extra"])
    assert sub.origin["subpath"] == "extra"
    assert not any("deeper" in f for f in fetched(hub))
    single = loramerge.load("org/adapters/extra/adapter_model.safetensors")
    assert same_deltas(single, published["extra"])


def test_local_path_wins_over_hub_id(hub, published, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = make_adapter(7)
    local.save(tmp_path / "org" / "adapters")
    hub.log.clear()
    loaded = loramerge.load("org/adapters")
    assert same_deltas(loaded, local)
    assert "repo_id" not in loaded.origin
    assert hub.log == []


def test_private_repository_needs_a_token(hub, tmp_path, monkeypatch):
    hub.create_repo("org/secret", private=True)
    hub.commit("org/secret", adapter_files(make_adapter(4), tmp_path, "secret"))
    with pytest.raises(SourceNotFound, match="set HF_TOKEN or log in"):
        loramerge.load("org/secret")
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    assert same_deltas(loramerge.load("org/secret"), make_adapter(4))
    assert any(auth for _, path, auth in hub.log if "org/secret" in path)


def test_missing_repository_revision_and_folder(hub, published):
    with pytest.raises(SourceNotFound, match="no such local file or folder, and no Hub repository org/nothing"):
        loramerge.load("org/nothing")
    with pytest.raises(SourceNotFound, match="org/adapters has no revision 'v9'"):
        loramerge.load("org/adapters@v9")
    with pytest.raises(SourceNotFound, match=r"has no adapter files .* in folder nope"):
        loramerge.load("org/adapters/nope")
    with pytest.raises(SourceNotFound, match=r"has no file missing\.safetensors"):
        loramerge.load("org/adapters/missing.safetensors")


def test_refused_token_is_reported_without_the_token(hub, published, monkeypatch):
    bad = "hf_invalidtokenZZZZZZZZZZZZZZZZ999"
    monkeypatch.setenv("HF_TOKEN", bad)
    with pytest.raises(HubError) as info:
        loramerge.load("org/adapters")
    assert "refused the credentials" in str(info.value) and bad not in str(info.value)


def test_connection_failure(hub, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    with pytest.raises(HubError, match=r"cannot reach the Hub at http://127\.0\.0\.1:\d+ and it is not in the local cache"):
        loramerge.load("org/adapters")


def test_offline_uses_the_cache_and_explains_a_miss(hub, published, monkeypatch):
    from huggingface_hub import constants

    online = loramerge.load("org/adapters@v1")
    hub.log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = loramerge.load("org/adapters@v1")
    assert same_deltas(offline, online) and offline.origin["commit"] == published["first"]
    assert hub.log == []
    with pytest.raises(HubError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        loramerge.load("org/adapters/extra")
    assert hub.log == []


def test_fetch_model_downloads_configs_and_weights_only(hub, tmp_path):
    hub.create_repo("org/base")
    hub.commit("org/base", {"config.json": b"{}", "model.safetensors": b"x" * 10, "pytorch_model.bin": b"p",
                            "tokenizer.json": b"{}", "sub/model.safetensors": b"y"})
    snapshot = fetch_model(HubRef("org/base"))
    assert sorted(p.name for p in snapshot.path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    with pytest.raises(SourceNotFound, match=r"no config\.json"):
        fetch_model(HubRef("org/base", subpath="sub"))


# ---------------------------------------------------------------------- the CLI, configured by the environment only


def cli_in_process(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def run_cli(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))} | env
    full["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "loramerge", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)


def test_cli_reads_hf_endpoint_token_and_offline_from_the_environment(hub, tmp_path):
    hub.create_repo("org/private", private=True)
    hub.commit("org/private", adapter_files(make_adapter(5), tmp_path, "p"))
    env = client_env(hub.url, str(tmp_path / "cli-home"))
    denied = run_cli(["inspect", "org/private"], env)
    assert denied.returncode == 1
    assert denied.stderr.strip().startswith("error: org/private:") and "Traceback" not in denied.stderr
    assert "set HF_TOKEN" in denied.stderr
    ok = run_cli(["inspect", "org/private", "--json"], env | {"HF_TOKEN": TOKEN})
    assert ok.returncode == 0, ok.stderr
    assert '"module_count": 2' in ok.stdout and TOKEN not in ok.stdout + ok.stderr
    cached = run_cli(["inspect", "org/private"], env | {"HF_HUB_OFFLINE": "1"})
    assert cached.returncode == 0, cached.stderr
    missing = run_cli(["inspect", "org/other"], env | {"HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN})
    assert missing.returncode == 1 and "HF_HUB_OFFLINE is set" in missing.stderr
    assert TOKEN not in missing.stdout + missing.stderr


# ---------------------------------------------------------------------- pushing and model cards


def merged_from_hub_and_local(hub, published, tmp_path) -> Adapter:
    local = make_adapter(9)
    local.save(tmp_path / "local-adapter")
    (tmp_path / "local-adapter" / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    sources = [loramerge.load("org/adapters@v1"), loramerge.load(tmp_path / "local-adapter")]
    return loramerge.merge(sources, method="svd", weights=[0.7, 0.3], rank=3)


def test_round_trip_push_then_load_by_repo_id_and_revision(hub, published, tmp_path, monkeypatch):
    merged = merged_from_hub_and_local(hub, published, tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = merged.push_to_hub("me/merged", commit_message="first merge")
    repo = hub.repos["me/merged"]
    assert result.commit == repo.refs["main"] and not repo.private
    assert sorted(repo.commits[result.commit]) == [
        ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", RECIPE,
    ]
    by_revision = loramerge.load(f"me/merged@{result.commit}")
    assert same_deltas(by_revision, merged)
    assert by_revision.origin["commit"] == result.commit
    assert same_deltas(loramerge.load("me/merged"), merged)


def test_model_card_parses_and_its_metadata_is_right(hub, published, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    merged = merged_from_hub_and_local(hub, published, tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = merged.push_to_hub("me/carded", description="Two adapters, re-ranked.")
    text = hub.repos["me/carded"].commits[result.commit]["README.md"].decode()
    card = ModelCard(text)
    assert card.data.base_model == "org/base"
    assert card.data.library_name == "peft"
    assert card.data.license == "apache-2.0"
    assert {"lora", "loramerge", "svd", "base_model:adapter:org/base"} <= set(card.data.tags)
    assert published["first"] in card.text  # the Hub source's resolved commit
    assert 'PeftModel.from_pretrained(base, "me/carded")' in card.text
    assert "Two adapters, re-ranked." in card.text and "model.layers.*.q_proj" in card.text
    recipe = yaml.safe_load(hub.repos["me/carded"].commits[result.commit][RECIPE])
    assert recipe["sources"][0] == {"repo": "org/adapters", "revision": published["first"], "weight": 0.7}
    assert recipe["method"] == "svd" and recipe["rank"] == 3


def test_license_is_left_out_when_sources_disagree(hub, published, tmp_path):
    from huggingface_hub import ModelCard

    from loramerge.hub.cards import model_card

    other = make_adapter(10)
    other.save(tmp_path / "mit-adapter")
    (tmp_path / "mit-adapter" / "README.md").write_text("---\nlicense: mit\n---\n")
    merged = loramerge.merge([loramerge.load("org/adapters@v1"), loramerge.load(tmp_path / "mit-adapter")])
    card = ModelCard(model_card(merged))
    assert card.data.license is None
    assert card.data.tags == ["lora", "loramerge", "linear", "base_model:adapter:org/base"]


def test_combine_pushes_with_credentials_from_the_environment(hub, published, tmp_path):
    env = client_env(hub.url, str(tmp_path / "cli-home")) | {"HF_TOKEN": TOKEN}
    out = tmp_path / "combined"
    done = run_cli(["combine", "org/adapters@v1", "org/adapters/extra", "-o", str(out), "--method", "svd",
                    "--rank", "2", "--push-to-hub", "me/combined", "--private", "--commit-message", "svd merge"], env)
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    repo = hub.repos["me/combined"]
    assert repo.private
    files = repo.commits[repo.refs["main"]]
    local_card = (out / "README.md").read_text()
    assert 'from_pretrained(base, "path/to/this/adapter")' in local_card
    assert 'from_pretrained(base, "me/combined")' in files["README.md"].decode()
    assert files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    saved = yaml.safe_load((out / RECIPE).read_text())
    assert [s["revision"] for s in saved["sources"]] == [published["first"], published["second"]]
    assert saved["sources"][1]["subfolder"] == "extra"
    assert all(TOKEN not in content.decode(errors="replace") for content in files.values())


def test_push_command_uploads_an_existing_folder(hub, tmp_path, monkeypatch):
    folder = make_adapter(11).save(tmp_path / "plain")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, text = cli_in_process(["push", str(folder), "me/plain", "--commit-message", "upload"])
    assert code == 0, text
    files = hub.repos["me/plain"].commits[hub.repos["me/plain"].refs["main"]]
    assert sorted(files) == [".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "library_name: peft" in files["README.md"].decode()
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    single = publish_output(folder / "adapter_model.safetensors", "me/single")
    assert "adapter_model.safetensors" in hub.repos["me/single"].commits[single.commit]


def test_push_without_credentials_sends_nothing(hub, tmp_path):
    folder = make_adapter(12).save(tmp_path / "a")
    hub.log.clear()
    with pytest.raises(HubError, match="pushing needs a token with write access; set HF_TOKEN or log in"):
        publish_output(folder, "me/nothing")
    code, text = cli_in_process(["combine", str(folder), "-o", str(tmp_path / "out"), "--push-to-hub", "me/x"])
    assert code == 1 and text.startswith("error: me/x: pushing needs a token") and "Traceback" not in text
    assert not (tmp_path / "out").exists()
    assert hub.log == []


@pytest.mark.parametrize(("token", "message"), [
    (READ_TOKEN, "the token has no write access to me/denied (403)"),
    ("hf_wrongtokenQQQQQQQQQQQQQQQQ777", "refused the credentials"),
])
def test_push_refused_by_the_hub(hub, tmp_path, monkeypatch, token, message):
    folder = make_adapter(13).save(tmp_path / "a")
    monkeypatch.setenv("HF_TOKEN", token)
    code, text = cli_in_process(["push", str(folder), "me/denied"])
    assert code == 1 and message in text and token not in text
    assert "me/denied" not in hub.repos


def test_push_while_offline_is_refused(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="cannot push while HF_HUB_OFFLINE is set"):
        make_adapter(14).push_to_hub("me/offline")


def test_large_files_take_the_lfs_path_both_ways(tmp_path, monkeypatch):
    from huggingface_hub import constants

    server = FakeHub(lfs=True).start()
    server.tokens[TOKEN] = True
    try:
        configure_client(monkeypatch, server.url, str(tmp_path / "home"))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the LFS batch protocol, not Xet
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        adapter = make_adapter(15)
        result = adapter.push_to_hub("me/lfs")
        assert "adapter_model.safetensors" in server.repos["me/lfs"].lfs_paths
        calls = [(m, p.split("/")[1] if p.startswith("/lfs") else p) for m, p, _ in server.log]
        assert ("POST", "/me/lfs.git/info/lfs/objects/batch") in calls and ("PUT", "lfs-upload") in calls
        assert same_deltas(loramerge.load(f"me/lfs@{result.commit}"), adapter)
    finally:
        server.stop()
        reset_client()


def test_recipe_with_a_hub_source_pushes_and_pins_the_commit(hub, published, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(
        "sources:\n"
        "  - repo: org/adapters\n    revision: v1\n    weight: 0.6\n"
        "  - repo: org/adapters\n    subfolder: extra\n    weight: [0.2, 0.4]\n"
        "method: svd\nrank: 2\n"
        "output:\n  push: {repo: me/from-recipe, private: true}\n"
    )
    merged = loramerge.run_recipe(recipe)
    repo = hub.repos["me/from-recipe"]
    files = repo.commits[repo.refs["main"]]
    assert repo.private and sorted(files) == [
        ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", RECIPE,
    ]
    saved = yaml.safe_load(files[RECIPE])
    assert saved["sources"][0] == {"repo": "org/adapters", "revision": published["first"], "weight": 0.6}
    assert saved["sources"][1] == {"repo": "org/adapters", "revision": published["second"], "subfolder": "extra",
                                   "weight": [0.2, 0.4]}
    hub.commit("org/adapters", {"adapter_model.safetensors": b"moved on"})  # main moves; the pin does not
    again = tmp_path / "again.yaml"
    again.write_bytes(files[RECIPE])
    assert same_deltas(loramerge.run_recipe(again), merged)


def test_publish_output_gives_other_outputs_a_minimal_card(hub, tmp_path, monkeypatch):
    """What fold/extract/convert call after writing: the folder is uploaded as is, plus a card."""
    from huggingface_hub import ModelCard

    model = tmp_path / "folded"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = publish_output(model, "me/folded", recipe={"base_model": "org/base", "sources": ["org/a"]})
    files = hub.repos["me/folded"].commits[result.commit]
    assert sorted(files) == [".gitattributes", "README.md", "config.json", RECIPE, "model.safetensors"]
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and "loramerge" in card.data.tags
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
