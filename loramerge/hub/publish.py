"""Writing an output with its model card and recipe, and publishing outputs to the Hub.

Where the card goes: a merge written as a folder (PEFT) gets ``README.md`` and
``loramerge_recipe.yaml`` inside it, in the same atomic write as the adapter (``card=False`` or
``--no-card`` skips them). A single-file output (kohya-style ``.safetensors``) is written alone;
its card and recipe are only uploaded, beside it in the repository, when it is pushed. A pushed
card names the repository in its loading example.

Any command that writes an output calls :func:`publish_output` afterwards to push it; that is
all ``--push-to-hub`` needs. fold and extract outputs are recognised by the ``loramerge.json``
they write: a folded model gets a model card (``library_name: transformers``, the base model, the
adapters folded in) in place of the base model's own README, an extracted adapter one with its
extraction report. :func:`push_fold` adds the fold recipe that reproduces the model, and
:func:`push_output` (``loramerge.push_to_hub``) pushes any result or path from Python.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from loramerge.core.adapter import Adapter, install_output_hook
from loramerge.hub.cards import (
    CARD_MARKER,
    extracted_adapter_card,
    fill_repo_id,
    folded_model_card,
    generic_card,
    has_placeholder,
    model_card,
)
from loramerge.io.hub import PushResult, push_to_hub
from loramerge.merge.overrides import POLICY_KEYS
from loramerge.recipe.model import RECIPE_FILENAME, dump_recipe, source_location
from loramerge.runtime.data import task_name_and_path

RECIPE_HEADER = ("The recipe this output was made with (written by loramerge).\n"
                 f"Reproduce it with: loramerge run {RECIPE_FILENAME} -o OUTPUT")


def save_output(adapter: Adapter, path: str | Path, *, format: str | None = None,
                dtype: torch.dtype | str | None = None, force: bool = False, card: bool = True,
                recipe: Mapping[str, Any] | None = None, description: str | None = None) -> Path:
    """Write ``adapter`` to ``path`` and, for folder formats, its card and recipe, all atomically.

    ``recipe`` defaults to the one recorded in the adapter's merge report, if any.

    Example:
        >>> import tempfile, torch
        >>> from loramerge import LowRank, merge
        >>> a = Adapter({"fc": LowRank(torch.ones(1, 3), torch.ones(2, 1))})
        >>> out = save_output(merge([a, a]), tempfile.mkdtemp() + "/merged")
        >>> sorted(p.name for p in out.iterdir())
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors', 'loramerge_recipe.yaml']
    """
    from loramerge.io.formats import get_format, write_adapter
    from loramerge.io.output import atomic_output

    path = Path(path)
    fmt = get_format(format) if format else None
    single_file = fmt.single_file if fmt is not None else _default_single_file(adapter)
    if not card or single_file:
        return write_adapter(adapter, path, format=format, dtype=dtype, force=force)
    if recipe is None:
        recipe = recipe_from_report(adapter, path)
    with atomic_output(path, force=force, directory=True) as tmp:
        write_adapter(adapter, tmp, format=format, dtype=dtype, force=True)
        write_card_files(tmp, adapter, recipe=recipe, description=description, format_name=format)
    return path


def write_card_files(folder: Path, adapter: Adapter, *, recipe: Mapping[str, Any] | None = None,
                     description: str | None = None, format_name: str | None = None,
                     repo_id: str | None = None) -> None:
    """Write ``README.md`` (and ``loramerge_recipe.yaml`` when there is a recipe) into ``folder``."""
    text = model_card(adapter, repo_id=repo_id, recipe=recipe, description=description, format_name=format_name)
    (folder / "README.md").write_text(text, encoding="utf-8")
    if recipe is not None:
        (folder / RECIPE_FILENAME).write_text(dump_recipe(recipe, RECIPE_HEADER), encoding="utf-8")


def publish_merge(adapter: Adapter, path: str | Path | None, *, format: str | None = None,
                  dtype: torch.dtype | str | None = None, force: bool = False, card: bool = True,
                  recipe: Mapping[str, Any] | None = None, description: str | None = None,
                  repo_id: str | None = None, private: bool = False, commit_message: str | None = None,
                  token: str | None = None) -> PushResult | None:
    """Write a merge result to ``path`` (if given) and push it to ``repo_id`` (if given)."""
    if recipe is None:
        recipe = recipe_from_report(adapter, Path(path) if path is not None else None)
    if path is not None:
        written = save_output(adapter, path, format=format, dtype=dtype, force=force, card=card, recipe=recipe,
                              description=description)
        if repo_id is None:
            return None
        extra = _card_files(adapter, repo_id, recipe, description, format, single=written.is_file()) if card else {}
        return push_to_hub(written, repo_id, private=private, commit_message=commit_message, token=token,
                           extra_files=extra or None)
    if repo_id is None:
        return None
    with tempfile.TemporaryDirectory(prefix="loramerge-push-") as tmp:
        written = save_output(adapter, Path(tmp) / "adapter", format=format, dtype=dtype, card=False)
        extra = _card_files(adapter, repo_id, recipe, description, format, single=True) if card else {}
        return push_to_hub(written, repo_id, private=private, commit_message=commit_message, token=token,
                           extra_files=extra or None)


def push_adapter(adapter: Adapter, repo_id: str, *, private: bool = False, commit_message: str | None = None,
                 token: str | None = None, format: str | None = None, dtype: torch.dtype | str | None = None,
                 description: str | None = None) -> PushResult:
    """What :meth:`Adapter.push_to_hub` does: save to a temporary folder with the card, then push."""
    result = publish_merge(adapter, None, format=format, dtype=dtype, description=description, repo_id=repo_id,
                           private=private, commit_message=commit_message, token=token)
    assert result is not None
    return result


def publish_output(path: str | Path, repo_id: str, *, private: bool = False, commit_message: str | None = None,
                   token: str | None = None, card: str | None = None,
                   recipe: Mapping[str, Any] | None = None) -> PushResult:
    """Push an output that is already written (any command's; also ``loramerge push``).

    The folder is not modified. Its ``README.md`` is uploaded as is, with the loading example
    pointed at ``repo_id`` when loramerge wrote it; without one, ``card`` (or a card generated from
    the adapter, or a minimal one for other outputs) is uploaded. ``recipe`` is uploaded as
    ``loramerge_recipe.yaml`` when the folder has none.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    extra: dict[str, bytes] = {}
    readme = folder / "README.md" if path.is_dir() else None
    ours = readme is not None and readme.is_file() and CARD_MARKER in readme.read_text(encoding="utf-8",
                                                                                           errors="replace")
    if card is None and not ours:
        # A fold output carries the base model's own README.md; its card must describe the fold.
        card = output_card(path, repo_id, recipe=recipe)
    if card is not None:
        extra["README.md"] = fill_repo_id(card, repo_id).encode()
    elif readme is not None and readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if ours and has_placeholder(text):
            extra["README.md"] = fill_repo_id(text, repo_id).encode()
    else:
        extra["README.md"] = _card_for_existing(path, repo_id, recipe).encode()
    if recipe is not None and not (path.is_dir() and (path / RECIPE_FILENAME).is_file()):
        extra[RECIPE_FILENAME] = dump_recipe(recipe, RECIPE_HEADER).encode()
    record = read_record(path)
    if record is not None:
        import json

        extra[RECORD_FILENAME] = (json.dumps(public_record(record), indent=2) + "\n").encode()
    return push_to_hub(path, repo_id, private=private, commit_message=commit_message, token=token,
                       extra_files=extra or None)


def _card_for_existing(path: Path, repo_id: str, recipe: Mapping[str, Any] | None) -> str:
    from loramerge.errors import LoramergeError
    from loramerge.io.sources import load

    if recipe is None and path.is_dir() and (path / RECIPE_FILENAME).is_file():
        from loramerge.io.structured import read_yaml

        try:
            recipe = read_yaml(path / RECIPE_FILENAME)
        except LoramergeError:
            recipe = None
    try:
        adapter = load(path)
    except LoramergeError:
        folder = path if path.is_dir() else path.parent
        library = "diffusers" if (folder / "model_index.json").exists() else "transformers"
        return generic_card(library, title=repo_id.split("/")[-1])
    return model_card(adapter, repo_id=repo_id, recipe=recipe if isinstance(recipe, Mapping) else None)


def _card_files(adapter: Adapter, repo_id: str, recipe: Mapping[str, Any] | None, description: str | None,
                format_name: str | None, *, single: bool) -> dict[str, bytes]:
    files = {"README.md": model_card(adapter, repo_id=repo_id, recipe=recipe, description=description,
                                     format_name=format_name).encode()}
    if single and recipe is not None:
        files[RECIPE_FILENAME] = dump_recipe(recipe, RECIPE_HEADER).encode()
    return files


def recipe_from_report(adapter: Adapter, out_dir: Path | None = None, **extra: Any) -> dict[str, Any] | None:
    """The recipe of a merge, rebuilt from its report: sources (Hub ones pinned to their commit),
    weights, method, parameters, rank policy and seed. None for an adapter that was not merged.

    ``extra`` adds top-level keys (``compute_dtype``, ``output``, ...). Per-module overrides given
    to :func:`loramerge.merge.engine` as a function cannot be written down; a recipe run saves its own.

    Example:
        >>> import torch
        >>> from loramerge import LowRank, merge
        >>> a = Adapter({"fc": LowRank(torch.ones(1, 3), torch.ones(2, 1))}, source="/data/a")
        >>> recipe_from_report(merge([a, a], method="svd", rank=1, weights=[0.5, 0.5]))["rank"]
        1
    """
    report = adapter.report
    if report is None:
        return None
    params = dict(report.parameters)
    block_weights = params.pop("block_weights", None) or []
    entries = []
    for i, name in enumerate(report.sources):
        origin = report.origins[i] if i < len(report.origins) else {}
        entry = source_location(origin, name, out_dir)
        entry["weight"] = report.weights[i] if i < len(report.weights) else 1.0
        if i < len(block_weights) and block_weights[i] is not None:
            entry["block_weights"] = block_weights[i]
        entries.append(entry)
    seed = params.pop("seed", 0)
    policy = {k: params.pop(k) for k in POLICY_KEYS if k in params}
    doc: dict[str, Any] = {"sources": entries, "method": report.method}
    if params:
        doc["parameters"] = params
    doc.update(policy)
    doc["seed"] = seed
    doc.update({k: v for k, v in extra.items() if v not in (None, False, {})})
    return doc


def add_data_to_recipe(recipe: dict[str, Any], model: str, data: Sequence[str], out_dir: Path) -> None:
    """Record a data-aware merge's model and per-source data files in ``recipe`` (local paths relative to ``out_dir``).

    Example:
        >>> doc = {"sources": [{"path": "a"}, {"path": "b"}]}
        >>> add_data_to_recipe(doc, "org/base", ["/d/a.jsonl", "/d/b.jsonl"], Path("/d/out"))
        >>> doc["model"], doc["sources"][1]["data"]
        ('org/base', '../b.jsonl')
    """
    local = Path(model).expanduser()
    recipe["model"] = model_location({"path": str(local.resolve())}, out_dir) if local.exists() else model
    for entry, spec in zip(recipe["sources"], data):
        _, path = task_name_and_path(spec)
        entry["data"] = source_location({"path": str(path.expanduser().resolve())}, None, out_dir)["path"]


def _default_single_file(adapter: Adapter) -> bool:
    from loramerge.io.formats import FORMATS

    return any(f.name == adapter.source_format and f.write is not None and f.single_file for f in FORMATS)


# --------------------------------------------------------------------------- fold, extract and convert outputs

RECORD_FILENAME = "loramerge.json"  # what fold and extract write beside their output


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The record fold or extract wrote with its output, or None: ``loramerge.json`` in an output
    folder, or the ``loramerge`` metadata entry of a single ``.safetensors`` file that fold wrote.

    Example:
        >>> import tempfile
        >>> read_record(tempfile.mkdtemp()) is None
        True
    """
    from loramerge.errors import LoramergeError
    from loramerge.io.formats.tensorfile import read_safetensors_header
    from loramerge.io.structured import parse_json, read_json

    path = Path(path)
    try:
        if path.is_dir():
            file = path / RECORD_FILENAME
            record = read_json(file) if file.is_file() else None
        elif path.suffix == ".safetensors" and path.is_file():
            raw = read_safetensors_header(path)[1].get("loramerge")
            record = parse_json(raw, name=f"{path}: loramerge metadata") if raw else None
        else:
            record = None
    except (OSError, ValueError, LoramergeError):
        return None
    return record if isinstance(record, dict) and record.get("command") in ("fold", "extract") else None


def public_record(value: Any) -> Any:
    """``value`` (a ``loramerge.json`` record) with every absolute local path cut to its last two
    components, and Hugging Face cache paths named by their repository and commit: what is pushed
    must not publish someone's directory layout.

    Example:
        >>> public_record({"base": {"source": "/home/ann/models/llama"}, "adapters": [{"source": "org/x@v1"}]})
        {'base': {'source': 'models/llama'}, 'adapters': [{'source': 'org/x@v1'}]}
    """
    import os
    import re

    from loramerge.io.hub import model_origin

    if isinstance(value, dict):
        return {k: public_record(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_record(v) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        if "/snapshots/" in value.replace("\\", "/"):
            origin = model_origin(value)
            if "repo_id" in origin:
                return model_location(origin, None)
        parts = [p for p in re.split(r"[\\/]", value) if p]
        return "/".join(parts[-2:])
    return value


def output_card(path: str | Path, repo_id: str | None, *, adapters: list[Adapter] | None = None,
                recipe: Mapping[str, Any] | None = None, description: str | None = None,
                record: Mapping[str, Any] | None = None) -> str | None:
    """The model card of a fold or extract output folder, built from its ``loramerge.json``; None
    for any other output. ``adapters`` (the loaded sources of a fold) add their resolved commits."""
    from loramerge.errors import LoramergeError
    from loramerge.io.hub import model_origin
    from loramerge.io.structured import read_json

    path = Path(path)
    record = record if record is not None else read_record(path)
    if record is None:
        return None
    if record.get("command") == "extract":
        from loramerge.io.sources import load

        try:
            adapter: Adapter | None = load(path)
        except LoramergeError:
            adapter = None
        return extracted_adapter_card(record, adapter, repo_id=repo_id, description=description)
    folder = path if path.is_dir() else path.parent
    try:
        config = read_json(folder / "config.json")
    except LoramergeError:
        config = {}
    library = "diffusers" if path.is_file() or (folder / "model_index.json").exists() else "transformers"
    source = (record.get("base") or {}).get("source")
    return folded_model_card(record, adapters=adapters, base_origin=model_origin(source) if source else None,
                             library=library, config=config if isinstance(config, dict) else None,
                             repo_id=repo_id, recipe=recipe, description=description)


def model_location(origin: Mapping[str, Any], out_dir: Path | None) -> str:
    """How a recipe names a base model: ``org/name[/sub]@commit`` for the Hub, else a path relative
    to ``out_dir`` (see :func:`loramerge.io.hub.model_origin`).

    Example:
        >>> model_location({"repo_id": "org/base", "commit": "abc"}, None)
        'org/base@abc'
        >>> model_location({"path": "/data/base"}, Path("/data/folded"))
        '../base'
    """
    from loramerge.io.hub import HubRef

    entry = source_location(origin, origin.get("path"), out_dir)
    if "repo" in entry:
        return str(HubRef(entry["repo"], entry.get("revision"), entry.get("subfolder")))
    return str(entry["path"])


def recipe_from_fold(record: Mapping[str, Any], adapters: list[Adapter], out_dir: Path | None,
                     **extra: Any) -> dict[str, Any]:
    """The fold recipe that reproduces a ``loramerge fold`` run, from its ``loramerge.json`` and the
    loaded sources: base model and sources pinned (Hub) or relative to ``out_dir`` (local).

    ``extra`` adds top-level keys (``compute_dtype``, ``allow_pickle``, ...).

    Example:
        >>> import torch
        >>> from loramerge import LowRank
        >>> a = Adapter({"fc": LowRank(torch.ones(1, 3), torch.ones(2, 1))}, source="/d/a", origin={"path": "/d/a"})
        >>> record = {"base": {"source": "/d/base"}, "adapters": [{"weight": 0.5}], "method": "linear",
        ...           "parameters": {"seed": 0}, "dtype": "bf16", "shard_size": None, "tied_embeddings": "refuse"}
        >>> recipe_from_fold(record, [a], Path("/d/out"))
        {'base_model': '../base', 'sources': [{'path': '../a', 'weight': 0.5}], 'method': 'linear', 'seed': 0, \
'output': {'dtype': 'bf16'}}
    """
    from loramerge.io.hub import model_origin

    base = (record.get("base") or {}).get("source")
    params = dict(record.get("parameters") or {})
    seed = params.pop("seed", 0)
    policy = {k: params.pop(k) for k in POLICY_KEYS if k in params}
    entries = []
    for adapter, entry in zip(adapters, record.get("adapters") or []):
        location = source_location(adapter.origin, adapter.source, out_dir)
        location["weight"] = entry.get("weight", 1.0)
        if entry.get("block_weights") is not None:
            location["block_weights"] = entry["block_weights"]
        entries.append(location)
    doc: dict[str, Any] = {"base_model": model_location(model_origin(base), out_dir) if base else None,
                           "sources": entries, "method": record.get("method", "linear")}
    if params:
        doc["parameters"] = params
    doc.update(policy)
    doc["seed"] = seed
    if record.get("tied_embeddings") not in (None, "refuse"):
        doc["tied_embeddings"] = record["tied_embeddings"]
    doc.update({k: v for k, v in extra.items() if v not in (None, False, {})})
    output = {k: v for k, v in (("dtype", record.get("dtype")), ("shard_size", record.get("shard_size")))
              if v not in (None, "keep")}
    if output:
        doc["output"] = output
    return doc


def push_output(output: Any, repo_id: str, *, private: bool = False, commit_message: str | None = None,
                token: str | None = None, description: str | None = None) -> PushResult:
    """Push what a loramerge call produced, with a model card: an :class:`Adapter`, the result of
    :func:`loramerge.fold.engine` or :func:`loramerge.extract`, or the path of any written output.

    This is ``loramerge.push_to_hub``. A fold output gets a card for a model (``library_name:
    transformers``, its base model, the adapters and weights folded in); an extracted adapter one
    with its extraction report; an adapter folder without a card one built from the adapter.

    Example (a target with a revision is refused before any request):
        >>> import tempfile
        >>> from loramerge.errors import LoramergeError
        >>> try:
        ...     push_output(tempfile.mkdtemp(), "me/model@v1")
        ... except LoramergeError as e:
        ...     print(e)
        me/model@v1: a push target must be a Hub repository id, org/name
    """
    if isinstance(output, Adapter):
        return output.push_to_hub(repo_id, private=private, commit_message=commit_message, token=token,
                                  description=description)
    path = Path(getattr(output, "path", output))
    card = output_card(path, repo_id, description=description) if description else None
    return publish_output(path, repo_id, private=private, commit_message=commit_message, token=token, card=card)


def push_fold(result: Any, repo_id: str, *, adapters: list[Any] | None = None, private: bool = False,
              commit_message: str | None = None, token: str | None = None, description: str | None = None,
              **recipe_extra: Any) -> PushResult:
    """Push the model folder a :func:`loramerge.fold.engine` call wrote (its ``FoldResult``) with a model card.

    With ``adapters``, the loaded sources it folded, the card gives their resolved commits and the
    push adds ``loramerge_recipe.yaml``, a fold recipe that reproduces the model (``recipe_extra``
    adds top-level keys such as ``compute_dtype``).
    """
    loaded = [a for a in adapters or [] if isinstance(a, Adapter)]
    known = bool(loaded) and len(loaded) == len(adapters or [])
    recipe = recipe_from_fold(result.recipe, loaded, Path(result.path), **recipe_extra) if known else None
    card = output_card(result.path, repo_id, adapters=loaded if known else None, recipe=recipe,
                       description=description, record=result.recipe)
    return publish_output(result.path, repo_id, private=private, commit_message=commit_message, token=token,
                          card=card, recipe=recipe)


install_output_hook("push_to_hub", push_adapter)
