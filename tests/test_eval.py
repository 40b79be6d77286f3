"""Evaluation data and scores: checked against transformers' own loss on one row at a time."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import loramerge
from loramerge.errors import DataError
from loramerge.runtime.data import load_tasks, read_prompts
from loramerge.runtime.resident import Runtime
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.runtime_fixtures import ROWS, char_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def runtime(world):
    return Runtime(copy.deepcopy(world["model"]), char_tokenizer())


def row_loss(model, tokenizer, prompt: str, completion: str) -> tuple[float, int, bool]:
    """Summed NLL of the completion tokens, their count, and whether all are the argmax: one row, no padding."""
    p = tokenizer(prompt)["input_ids"] if prompt else []
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    labels = ids.clone()
    labels[0, :max(1, len(p))] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    count = int((labels != -100).sum())
    hits = out.logits[0, :-1].argmax(-1)[labels[0, 1:] != -100] == ids[0, 1:][labels[0, 1:] != -100]
    return float(out.loss) * count, count, bool(hits.all())


def test_completion_scores_are_token_weighted_and_padding_free(world, runtime):
    tokenizer, model = runtime.tokenizer, world["model"]
    expected = [row_loss(model, tokenizer, r["prompt"], r["completion"]) for r in ROWS["add"]]
    tasks = load_tasks([world["data"]["add"]])
    for batch_size in (1, 3):  # padding must not change a thing
        score = runtime.evaluate(tasks, batch_size=batch_size)["add"]
        assert score.tokens == sum(n for _, n, _ in expected)
        assert score.loss == pytest.approx(sum(nll for nll, _, _ in expected) / score.tokens, rel=1e-5)
        assert score.accuracy == pytest.approx(sum(ok for _, _, ok in expected) / len(expected))


def test_text_rows_score_every_token_after_the_first(world, runtime):
    tokenizer, model = runtime.tokenizer, world["model"]
    nll = tokens = 0.0
    for row in ROWS["prose"]:
        ids = torch.tensor([tokenizer(row["text"])["input_ids"]])
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
        nll += float(out.loss) * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    score = runtime.evaluate(load_tasks([world["data"]["prose"]]), batch_size=2)["prose"]
    assert score.kind == "text" and score.metric == "ppl"
    assert score.perplexity == pytest.approx(float(torch.exp(torch.tensor(nll / tokens))), rel=1e-5)


def test_multiple_choice_picks_the_highest_summed_log_likelihood(world, runtime):
    tokenizer, model = runtime.tokenizer, world["model"]
    right = 0
    for row in ROWS["pick"]:
        sums = [-row_loss(model, tokenizer, row["prompt"], choice)[0] for choice in row["choices"]]
        right += int(max(range(len(sums)), key=sums.__getitem__) == row["answer"])
    score = runtime.evaluate(load_tasks([world["data"]["pick"]]), batch_size=4)["pick"]
    assert score.accuracy == pytest.approx(right / len(ROWS["pick"]))


def test_chat_rows_use_the_template_and_score_the_last_assistant_turn(world, runtime):
    tokenizer, model = runtime.tokenizer, world["model"]
    total = count = 0.0
    for row in ROWS["chat"]:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        completion = full[len(prompt):]
        assert completion == row["messages"][-1]["content"] + "</s>"
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        labels = ids.clone()
        labels[0, :len(p)] = -100
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels).loss) * len(c)
        count += len(c)
    score = runtime.evaluate(load_tasks([world["data"]["chat"]]), batch_size=2)["chat"]
    assert score.tokens == count and score.loss == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize(("row", "message"), [
    ({"question": "?"}, "row 2: no row type fits the fields question"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": 2}, "row 2: 'answer' must be the index of the right choice"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "row 2: the last message must be the assistant's turn"),
    ({"prompt": "p", "completion": ""}, "row 2: empty 'completion'"),
])
def test_bad_rows_name_the_file_and_the_row(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, row])
    with pytest.raises(DataError, match=f"bad.jsonl: {message}"):
        load_tasks([path])


def test_empty_mixed_and_unparsable_tasks_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.jsonl: task 'empty' has no rows"):
        load_tasks([tmp_path / "empty.jsonl"])
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: row 2: invalid JSON"):
        load_tasks([tmp_path / "broken.jsonl"])
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a"}, {"prompt": "p", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(DataError, match=r"mixes row types text \(row 1\), choice \(row 2\)"):
        load_tasks([mixed])
    with pytest.raises(DataError, match="task name 'x' is also used"):
        load_tasks([f"x={mixed}", f"x={tmp_path / 'broken.jsonl'}"], limit=1)


def test_a_row_longer_than_the_context_is_named(world, runtime, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "ok", "completion": "1"},
                                                 {"prompt": "x" * 80, "completion": "y"}])
    with pytest.raises(DataError, match=r"long.jsonl: row 2: 82 tokens, longer than the model's context of 64"):
        runtime.evaluate(load_tasks([path]))


def test_prompts_files_are_jsonl_or_plain_text(tmp_path, world):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond\n")
    assert [r.data["text"] for r in read_prompts(tmp_path / "p.txt")] == ["first prompt", "second"]
    assert [r.kind for r in read_prompts(world["data"]["pick"], limit=2)] == ["choice", "choice"]


def test_evaluate_scores_base_adapters_and_normalizes_paired_tasks(world):
    adapters, data = world["adapters"], world["data"]
    result = loramerge.evaluate(world["base"], [adapters["a"], adapters["b"]], [data["add"], data["pick"]],
                                paired=True, batch_size=4)
    assert result.models == ["base", "a", "b"] and result.own == {"add": "a", "pick": "b"}
    runtime = Runtime.load(world["base"])
    with runtime.applied(adapters["b"]):
        direct = runtime.evaluate(load_tasks([data["add"], data["pick"]]))
    assert result.scores["b"]["add"].loss == pytest.approx(direct["add"].loss, rel=1e-6)
    normalized = result.normalized("base")
    for task, own in result.own.items():
        own_score = result.score(own, task)
        expected = result.score("base", task) / own_score if own_score else float("nan")
        assert normalized[task] == pytest.approx(expected, nan_ok=True)
    assert result.normalized("b")["pick"] in (1.0, pytest.approx(float("nan"), nan_ok=True))
    assert "normalized" in result.table() and "add (acc)" in result.table()


def test_a_scoring_function_replaces_the_built_in_metrics(world):
    def mean_first_logit(model, rows):
        ids = torch.tensor([[1, 5 + len(r["anything"])] for r in rows])
        return float(model(input_ids=ids).logits[..., 0].mean())

    rows = {"custom": [{"anything": "abc"}, {"anything": "de"}]}
    result = loramerge.evaluate(world["base"], {"tuned": world["adapters"]["a"]}, rows, score=mean_first_logit)
    runtime = Runtime(copy.deepcopy(world["model"]))
    assert result.score("base", "custom") == pytest.approx(mean_first_logit(runtime.model, rows["custom"]))
    with runtime.applied(world["adapters"]["a"]):
        assert result.score("tuned", "custom") == pytest.approx(mean_first_logit(runtime.model, rows["custom"]))


def test_eval_cli_prints_one_table_and_writes_json(world, tmp_path):
    data = world["data"]
    out = tmp_path / "scores.json"
    result = run_cli("eval", world["base"], world["adapters"]["a"], world["adapters"]["b"], "--data", data["add"],
                     "--data", f"choice={data['pick']}", "--paired", "--batch-size", "2", "--limit", "2", "--json", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["model", "add", "(acc)", "choice", "(acc)", "avg", "avg", "loss", "avg", "norm"]
    assert [line.split()[0] for line in lines[1:4]] == ["base", "a", "b"]
    assert any(line.startswith("normalized") for line in lines)
    saved = json.loads(out.read_text())
    assert saved["tasks"] == ["add", "choice"] and saved["own"] == {"add": "a", "choice": "b"}
    assert saved["models"]["a"]["tasks"]["add"]["rows"] == 2
    assert saved["models"]["b"]["tasks"]["add"]["loss"] == pytest.approx(
        loramerge.evaluate(world["base"], [world["adapters"]["b"]], [data["add"]], limit=2,
                           include_base=False).scores["b"]["add"].loss, rel=1e-6)


def test_eval_cli_errors_are_one_line(world, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    assert_clean_failure(run_cli("eval", world["base"], "--data", bad), "bad.jsonl: row 1: no row type fits")
    assert_clean_failure(run_cli("eval", world["base"], world["adapters"]["a"], "--data", world["data"]["add"],
                                 "--data", world["data"]["pick"], "--paired"),
                         "--paired needs one adapter per task")
