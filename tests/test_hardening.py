"""Issue 15's hostile inputs, one plain regression test each: one clear line or the correct result.

Every case here once ended in a traceback, a hang, a wrong result or a leak. The promise checked
is the README's: exit status 1 with one ``error:`` line naming the file (and module), no partial
output, nothing replaced without ``--force``, no secret written.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramerge
from loramerge.errors import (
    CorruptFile,
    InvalidParameter,
    LoramergeError,
    OutputExists,
    RecipeError,
    WriteFailed,
)
from loramerge.io.output import atomic_output, check_output, write_file
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.fold_models import make_adapter, save_base, tiny_llama
from tests.test_errors import edit_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = tiny_llama()
    folder = save_base(model, tmp_path_factory.mktemp("base") / "llama")
    adapter = make_adapter(model, tmp_path_factory.mktemp("adapter") / "math", target_modules=["q_proj", "v_proj"])
    return folder, adapter


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_tensors(folder: Path, edit) -> Path:
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ------------------------------------------------------------------------------ security


def test_fold_refuses_a_symlink_that_leaks_the_environment(base, tmp_path):
    folder, adapter = base
    evil = copy_tree(folder, tmp_path / "evil")
    (evil / "tokenizer.json").symlink_to("/proc/self/environ")
    out = tmp_path / "out"
    env = {"HF_TOKEN": "hf_secretsecretsecretsecret00"}
    os.environ.update(env)
    try:
        result = run_cli("fold", evil, adapter, "-o", out)
    finally:
        os.environ.pop("HF_TOKEN")
    assert_clean_failure(result, "tokenizer.json", "not a regular file")
    assert not out.exists() and not leftovers(tmp_path)
    assert "hf_secret" not in result.output


def test_fold_refuses_links_leaving_the_base_folder_unless_asked(base, tmp_path):
    folder, adapter = base
    secret = tmp_path / "secret.txt"
    secret.write_text("do not publish")
    evil = copy_tree(folder, tmp_path / "evil")
    (evil / "notes.txt").symlink_to(secret)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("fold", evil, adapter, "-o", out), "notes.txt", "outside the base folder",
                         "--follow-symlinks")
    assert not out.exists()
    result = run_cli("fold", evil, adapter, "-o", out, "--follow-symlinks")
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "do not publish" and not (out / "notes.txt").is_symlink()


def test_fold_copies_links_inside_the_base_folder_and_refuses_fifos(base, tmp_path):
    folder, adapter = base
    inside = copy_tree(folder, tmp_path / "inside")
    (inside / "tokenizer_copy.json").symlink_to(inside / "tokenizer_config.json")
    out = tmp_path / "out"
    result = run_cli("fold", inside, adapter, "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer_copy.json").read_text() == (inside / "tokenizer_config.json").read_text()
    os.mkfifo(inside / "pipe.txt")
    assert_clean_failure(run_cli("fold", inside, adapter, "-o", tmp_path / "out2"), "pipe.txt", "FIFO")


def test_malicious_pickle_is_refused_even_with_allow_pickle(base, tmp_path):
    _, adapter = base
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = copy_tree(adapter, tmp_path / "pickled")
    (folder / "adapter_model.safetensors").unlink()
    with open(folder / "adapter_model.bin", "wb") as fh:
        pickle.dump({"base_model.model.x.lora_A.weight": Evil()}, fh)
    assert_clean_failure(run_cli("inspect", folder, "--allow-pickle"), "adapter_model.bin")
    assert not marker.exists()


@pytest.mark.parametrize("spelling", [
    "org/name@../../../../tmp/x", "org/name/../../x", "org/name/sub/..", "../org/name", "org/na..me",
    "org/name@refs/../../x", "org/name/a\\..\\b",
])
def test_hub_ids_cannot_traverse(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoramergeError):
        loramerge.load(spelling)
    result = run_cli("inspect", spelling)
    assert_clean_failure(result)


def test_hub_refs_made_from_parts_are_checked():
    from loramerge.io.hub import HubRef

    for revision, sub in (("../x", None), (None, "../x"), (None, "a//b"), ("a b", None)):
        with pytest.raises(InvalidParameter, match="not a valid Hub reference"):
            HubRef("org/name", revision, sub)


# ----------------------------------------------------------------- inputs destroyed or replaced


def test_report_never_overwrites_without_force(base, tmp_path):
    _, adapter = base
    victim = copy_tree(adapter, tmp_path / "victim")
    before = (victim / "adapter_config.json").read_bytes()
    out = tmp_path / "out"
    result = run_cli("combine", victim, "-o", out, "--report", victim / "adapter_config.json")
    assert_clean_failure(result, "adapter_config.json", "--force")
    assert (victim / "adapter_config.json").read_bytes() == before and not out.exists()
    ok = run_cli("combine", victim, "-o", out, "--report", tmp_path / "report.json")
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "report.json").read_text())["method"] == "linear"


def test_the_loser_of_two_writers_fails_cleanly(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputExists, match="another run wrote this output"), \
            atomic_output(target, force=False) as slow:
        (slow / "who").write_text("slow")
        with atomic_output(target, force=False) as fast:  # the same process: no live-writer refusal
            (fast / "who").write_text("fast")
    assert (target / "who").read_text() == "fast" and leftovers(tmp_path) == []
    with pytest.raises(OutputExists, match="another run wrote this output"), \
            atomic_output(tmp_path / "file.json", force=False, directory=False) as tmp:
        tmp.write_text("mine")
        write_file(tmp_path / "file.json", "theirs", force=False)
    assert (tmp_path / "file.json").read_text() == "theirs"


def test_concurrent_folds_to_one_new_output(base, tmp_path):
    folder, adapter = base
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "loramerge", "fold", str(folder), str(adapter), "-o", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    lines = [line for line in loser.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in loser and "out" in lines[0], loser
    assert leftovers(tmp_path) == []


def test_another_live_run_is_refused_at_once(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f".out.tmp-{sleeper.pid}-abcd").mkdir()
        with pytest.raises(OutputExists, match=f"process {sleeper.pid}"):
            check_output(tmp_path / "out", force=True)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_interrupt_after_the_output_is_in_place_says_so(base, tmp_path, monkeypatch):
    folder, adapter = base
    from loramerge.fold.engine import FoldResult

    def interrupted_summary(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(FoldResult, "summary", interrupted_summary)
    out = tmp_path / "out"
    result = run_cli("fold", folder, adapter, "-o", out)
    assert result.exit_code == 130
    assert "interrupted after the output was written" in result.stderr and str(out) in result.stderr
    assert "Traceback" not in result.output and out.is_dir()


SLOW_FOLD = """
import sys, time
import loramerge.io.shards as shards
original = shards.ShardWriter.write_parts
def slow(self, name, parts):
    print("writing", flush=True)
    time.sleep(60)
    return original(self, name, parts)
shards.ShardWriter.write_parts = slow
from loramerge.cli import main
main(sys.argv[1:], prog_name="loramerge")
"""


def test_sigint_during_fold_is_one_true_line_and_leaves_nothing(base, tmp_path):
    folder, adapter = base
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_FOLD, "fold", str(folder), str(adapter), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=30)
    err = proc.stderr.read()
    assert code == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; no output was written" and "Traceback" not in err, err
    assert not out.exists() and leftovers(tmp_path) == []


def test_shard_writer_abort_does_not_wait_for_a_blocked_thread(tmp_path):
    from loramerge.io.shards import OutEntry, ShardWriter

    release = threading.Event()
    writer = ShardWriter(tmp_path / "s.safetensors", [OutEntry("a", "F32", (2,))], background=True)
    writer._submit(lambda: release.wait(60))  # a write stuck in the kernel
    start = time.monotonic()
    writer.abort()
    assert time.monotonic() - start < 10
    release.set()


def test_sigkill_leftovers_are_removed_by_the_next_run(base, tmp_path):
    _, adapter = base
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    result = run_cli("combine", adapter, "-o", out)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and f"removed {stale}" in result.stderr


def test_outputs_get_the_umask_permissions(base, tmp_path):
    _, adapter = base
    old = os.umask(0o022)
    try:
        assert run_cli("combine", adapter, "-o", tmp_path / "out").exit_code == 0
        assert run_cli("combine", adapter, "-o", tmp_path / "k.safetensors", "--format", "kohya").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "k.safetensors").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------- wrong results accepted


def test_fold_refuses_weights_that_overflow(base, tmp_path):
    folder, adapter = base
    out = tmp_path / "out"
    assert_clean_failure(run_cli("fold", folder, adapter, "-o", out, "--weights", "1e39"), "overflows")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("change", ["negative shape", "metadata number"])
def test_fold_refuses_a_base_shard_header_safetensors_would_refuse(base, tmp_path, change):
    folder, adapter = base
    bad = copy_tree(folder, tmp_path / "bad")
    shard = bad / "model.safetensors"
    raw = shard.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    if change == "negative shape":
        name = next(k for k in header if k.endswith("norm.weight"))
        header[name]["shape"] = [-1, -header[name]["shape"][0]]
    else:
        header["__metadata__"] = {"format": "pt", "step": 7}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])
    out = tmp_path / "out"
    assert_clean_failure(run_cli("fold", bad, adapter, "-o", out), "model.safetensors")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("field,value,fragment", [
    ("r", 8.5, "r: must be a positive integer"),
    ("r", [8], "r: must be a positive integer"),
    ("lora_alpha", "16", "lora_alpha: must be a positive number"),
    ("target_modules", [1, 2], "target_modules"),
    ("rank_pattern", {"q_proj": 2.5}, "rank_pattern.q_proj"),
    ("use_rslora", "yes", "use_rslora"),
])
def test_config_fields_of_the_wrong_type(base, tmp_path, field, value, fragment):
    _, adapter = base
    folder = edit_config(copy_tree(adapter, tmp_path / "a"), **{field: value})
    with pytest.raises(CorruptFile, match=r"adapter_config\.json:"):
        loramerge.load(folder)
    assert_clean_failure(run_cli("inspect", folder), "adapter_config.json", fragment)


def test_catastrophic_rank_pattern_does_not_hang(base, tmp_path):
    _, adapter = base
    folder = edit_config(copy_tree(adapter, tmp_path / "a"), rank_pattern={"(a|aa)+$": 4, "(.*)*x": 2})
    start = time.monotonic()
    loaded = loramerge.load(folder)
    assert time.monotonic() - start < 5 and loaded.modules
    edit_config(folder, rank_pattern={"(q|k)\\1": 4})
    assert_clean_failure(run_cli("inspect", folder), "rank_pattern", "backreferences")


def test_llama_and_sd1_adapters_do_not_merge(base, tmp_path):
    from tests.sd_fixtures import gen, kohya_module, lora_factors

    _, adapter = base
    sd1 = tmp_path / "sd1.safetensors"
    save_file(kohya_module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                           *lora_factors((320, 320), 2, gen(0)), 1.0), str(sd1))
    assert_clean_failure(run_cli("combine", adapter, sd1, "-o", tmp_path / "out"), "architectures")
    assert_clean_failure(run_cli("combine", sd1, adapter, "-o", tmp_path / "out"), "SD 1")
    assert not (tmp_path / "out").exists()


def test_kohya_output_needs_the_safetensors_suffix(tmp_path):
    from tests.sd_fixtures import gen, kohya_module, lora_factors

    src = tmp_path / "sd1.safetensors"
    save_file(kohya_module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                           *lora_factors((320, 320), 2, gen(0)), 1.0), str(src))
    assert_clean_failure(run_cli("combine", src, "-o", tmp_path / "merged"), "merged.safetensors")
    assert not (tmp_path / "merged").exists()
    assert run_cli("combine", src, "-o", tmp_path / "merged.safetensors").exit_code == 0
    assert loramerge.load(tmp_path / "merged.safetensors").modules


# ------------------------------------------------------------------------- tensors of bad shape

KOHYA_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
KOHYA_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def kohya_file(tmp_path, tensors, name="bad.safetensors") -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


KOHYA_CASES = {
    "alpha with 2 elements": ({f"{KOHYA_Q}.lora_down.weight": torch.randn(4, 320),
                               f"{KOHYA_Q}.lora_up.weight": torch.randn(320, 4),
                               f"{KOHYA_Q}.alpha": torch.tensor([4.0, 8.0])}, "alpha must hold one number"),
    "1-D lora_down": ({f"{KOHYA_Q}.lora_down.weight": torch.randn(320),
                       f"{KOHYA_Q}.lora_up.weight": torch.randn(320, 4)}, "lora_down.weight has shape (320,)"),
    "rank 0": ({f"{KOHYA_Q}.lora_down.weight": torch.randn(0, 320),
                f"{KOHYA_Q}.lora_up.weight": torch.randn(320, 0)}, "size 0"),
    "rank mismatch": ({f"{KOHYA_Q}.lora_down.weight": torch.randn(4, 320),
                       f"{KOHYA_Q}.lora_up.weight": torch.randn(320, 3)}, "rank 4"),
    "bad lora_mid": ({f"{KOHYA_CONV}.lora_down.weight": torch.randn(4, 320, 1, 1),
                      f"{KOHYA_CONV}.lora_mid.weight": torch.randn(3, 4, 3, 3),
                      f"{KOHYA_CONV}.lora_up.weight": torch.randn(320, 4, 1, 1)}, "lora_mid.weight"),
    "LoHa missing a factor": ({f"{KOHYA_Q}.hada_w1_a": torch.randn(320, 2), f"{KOHYA_Q}.hada_w1_b": torch.randn(2, 320),
                               f"{KOHYA_Q}.hada_w2_a": torch.randn(320, 2)}, "hada_w2_b"),
    "LoHa mixed with LoRA": ({f"{KOHYA_Q}.hada_w1_a": torch.randn(320, 2), f"{KOHYA_Q}.hada_w1_b": torch.randn(2, 320),
                              f"{KOHYA_Q}.lora_down.weight": torch.randn(2, 320),
                              f"{KOHYA_Q}.lora_up.weight": torch.randn(320, 2)}, "mixes the tensors"),
    "LoHa of the wrong rank": ({f"{KOHYA_Q}.hada_w1_a": torch.randn(320, 2), f"{KOHYA_Q}.hada_w1_b": torch.randn(3, 320),
                                f"{KOHYA_Q}.hada_w2_a": torch.randn(320, 2),
                                f"{KOHYA_Q}.hada_w2_b": torch.randn(2, 320)}, "hada_w1_b has rank 3"),
    "LoKr of the wrong rank": ({f"{KOHYA_Q}.lokr_w1": torch.randn(4, 4), f"{KOHYA_Q}.lokr_w2_a": torch.randn(80, 2),
                                f"{KOHYA_Q}.lokr_w2_b": torch.randn(3, 80)}, "lokr_w2_b has rank 3"),
    "NaN factor": ({f"{KOHYA_Q}.lora_down.weight": torch.full((4, 320), float("nan")),
                    f"{KOHYA_Q}.lora_up.weight": torch.randn(320, 4)}, "NaN"),
    "integer factor": ({f"{KOHYA_Q}.lora_down.weight": torch.ones(4, 320, dtype=torch.int32),
                        f"{KOHYA_Q}.lora_up.weight": torch.randn(320, 4)}, "floating point"),
}


@pytest.mark.parametrize("case", sorted(KOHYA_CASES))
def test_kohya_and_lycoris_tensors_of_bad_shape(tmp_path, case):
    tensors, fragment = KOHYA_CASES[case]
    path = kohya_file(tmp_path, tensors)
    with pytest.raises(LoramergeError):
        loramerge.load(path)
    assert_clean_failure(run_cli("inspect", path), "bad.safetensors", fragment)


def test_peft_rank_zero_and_one_dimensional_factors(base, tmp_path):
    _, adapter = base
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    zero = edit_tensors(copy_tree(adapter, tmp_path / "zero"), lambda t: t.update({key: torch.zeros(0, 32)}))
    assert_clean_failure(run_cli("inspect", zero), "adapter_model.safetensors", "size 0")
    flat = edit_tensors(copy_tree(adapter, tmp_path / "flat"), lambda t: t.update({key: torch.zeros(32)}))
    assert_clean_failure(run_cli("inspect", flat), "adapter_model.safetensors", "q_proj")


def test_float8_adapter_tensors_are_read_exactly(base, tmp_path):
    _, adapter = base
    original = load_file(adapter / "adapter_model.safetensors")
    folder = edit_tensors(copy_tree(adapter, tmp_path / "f8"),
                          lambda t: t.update({k: v.to(torch.float8_e4m3fn) for k, v in t.items()}))
    loaded = loramerge.load(folder)
    module = "model.layers.0.self_attn.q_proj"
    expected = original[f"base_model.model.{module}.lora_A.weight"].to(torch.float8_e4m3fn).float()
    assert torch.equal(loaded[module].A.float(), expected)
    result = run_cli("combine", folder, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    nan = edit_tensors(copy_tree(folder, tmp_path / "nan"),
                       lambda t: t.update({k: torch.full(v.shape, float("nan")).to(v.dtype) for k, v in t.items()}))
    assert_clean_failure(run_cli("inspect", nan), "NaN/Inf")


# ------------------------------------------------------------------------ recipes and structured files


def test_run_refuses_device_files_fifos_and_binaries(tmp_path):
    assert_clean_failure(run_cli("run", "/dev/zero", "-o", tmp_path / "out"), "/dev/zero", "not a regular file")
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    start = time.monotonic()
    assert_clean_failure(run_cli("run", fifo, "-o", tmp_path / "out"), "FIFO")
    assert time.monotonic() - start < 10
    binary = tmp_path / "image.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert_clean_failure(run_cli("run", binary, "-o", tmp_path / "out"), "not a text file")


@pytest.mark.parametrize("text,fragment", [
    ("sources: " + "[" * 5000 + "]" * 5000, "nested more than"),
    ("sources: !!python/name:os.system [a]", "tag !!python/name:os.system is not allowed"),
    ("sources: [a]\nseed: " + "9" * 5000, "4,300"),
    ("sources: [a\nmethod: svd\n", "invalid YAML"),
    ("a: &a [*a, *a]\nsources: [x]", "refers to the value that holds it"),
    ("sources: [a]\nseed: \x99\n", "unacceptable character"),
    ('sources: ["\\U99999999"]', "invalid YAML"),
])
def test_hostile_yaml_recipes(tmp_path, text, fragment):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError):
        loramerge.recipe.reader.load_recipe(path)
    assert_clean_failure(run_cli("run", path, "-o", tmp_path / "out"), "recipe.yaml", fragment)


def test_hostile_set_values(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("sources: [a]\n")
    for value, fragment in (("[" * 5000, "nested more than"), ("!!python/object/apply:os.system [x]", "not allowed"),
                            ("9" * 5000, "4,300")):
        assert_clean_failure(run_cli("run", path, "--set", f"seed={value}", "-o", tmp_path / "out"), "--set seed",
                             fragment)
    assert_clean_failure(run_cli("run", path, "--set", "a." * 500 + "b=1", "-o", tmp_path / "out"), "--set")


@pytest.mark.parametrize("text,fragment", [
    ('{"r": ' + "[" * 5000 + "]" * 5000 + "}", "nested more than"),
    ('{"r": ' + "9" * 5000 + "}", "4,300"),
    ("\x00\x01\x02", "not a text file"),
])
def test_hostile_adapter_configs(base, tmp_path, text, fragment):
    _, adapter = base
    folder = copy_tree(adapter, tmp_path / "a")
    (folder / "adapter_config.json").write_text(text)
    assert_clean_failure(run_cli("inspect", folder), "adapter_config.json", fragment)


# ------------------------------------------------------------------------------- output paths


def test_output_path_mistakes(base, tmp_path, monkeypatch):
    _, adapter = base
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("keep")
    assert_clean_failure(run_cli("combine", adapter, "-o", ".", "--force"), "current folder")
    assert (tmp_path / "keep.txt").read_text() == "keep"
    assert_clean_failure(run_cli("combine", adapter, "-o", "keep.txt/out"), "keep.txt is a file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert_clean_failure(run_cli("combine", adapter, "-o", "dangling"), "symbolic link")
    assert_clean_failure(run_cli("combine", adapter, "-o", "/proc/loramerge-out"), "/proc")


def test_full_disk_and_read_only_file_system_are_one_line(base, tmp_path, monkeypatch):
    import errno

    import loramerge.io.output as output

    _, adapter = base
    for code, fragment in ((errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"),
                           (errno.EACCES, "permission denied")):
        def refuse(*args, code=code, **kwargs):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(output, "_commit", refuse)
        out = tmp_path / f"out-{code}"
        assert_clean_failure(run_cli("combine", adapter, "-o", out), str(out), fragment)
        assert not out.exists() and leftovers(tmp_path) == []
        monkeypatch.undo()


FILE_SIZE_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from loramerge.cli import main
main(sys.argv[2:], prog_name="loramerge")
"""


@pytest.mark.parametrize("command", ["combine-peft", "combine-kohya", "fold", "yaml-report"])
def test_file_size_limit_in_every_writer(base, tmp_path, command):
    folder, adapter = base
    out = tmp_path / "out"
    args = {
        "combine-peft": ["combine", adapter, "-o", out],
        "combine-kohya": ["combine", adapter, "-o", tmp_path / "out.safetensors", "--format", "kohya"],
        "fold": ["fold", folder, adapter, "-o", out],
        # The adapter itself is small; the YAML recipe and the report are the files over the limit.
        "yaml-report": ["combine", adapter, "-o", out, "--report", tmp_path / "report.json"],
    }[command]
    proc = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, "2048", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "file-size limit" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert ".tmp-" not in lines[0] and leftovers(tmp_path) == []


def test_text_writers_translate_the_file_size_limit(tmp_path):
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))\n"
            "from loramerge.io.output import write_file\n"
            "from loramerge.errors import WriteFailed\n"
            "try:\n"
            f"    write_file({str(tmp_path / 'r.yaml')!r}, 'sources: [a]\\n' * 500, force=False)\n"
            "except WriteFailed as e:\n"
            "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "r.yaml: cannot write the output (a file would exceed the file-size limit" in proc.stdout, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ CLI boundary


def test_unexpected_errors_are_one_line_with_a_debug_hint(base, monkeypatch):
    _, adapter = base
    import loramerge.cli.inspect_adapter as inspect_cli

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(inspect_cli, "load", broken)
    monkeypatch.delenv("LORAMERGE_DEBUG", raising=False)
    result = run_cli("inspect", adapter)
    assert_clean_failure(result, "internal error", "ZeroDivisionError", "--debug")
    debug = run_cli("--debug", "inspect", adapter)
    assert isinstance(debug.exception, ZeroDivisionError)  # re-raised: tests and --debug see the bug


def test_device_names_torch_does_not_know(base, tmp_path):
    _, adapter = base
    assert_clean_failure(run_cli("combine", adapter, "-o", tmp_path / "out", "--device", "tpu:7"), "tpu:7")
    assert not (tmp_path / "out").exists()


def test_write_failed_and_output_exists_are_loramerge_errors():
    assert issubclass(WriteFailed, LoramergeError) and issubclass(OutputExists, LoramergeError)


def test_push_refuses_a_folder_that_would_publish_a_secret(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "README.md").write_text("hi")
    (folder / "tokenizer.json").symlink_to("/proc/self/environ")
    with pytest.raises(CorruptFile, match=r"tokenizer\.json"):
        loramerge.io.hub.push_to_hub(folder, "me/model", token="hf_" + "x" * 30)
    assert_clean_failure(run_cli("push", folder, "me/model"), "tokenizer.json", "not a regular file")


def test_diffusers_zero_dimensional_factor_and_overflowing_updates(tmp_path):
    from tests import fuzz_cases as fc

    tensors, meta = fc.diffusers_tensors()
    key = next(k for k in tensors if k.endswith("to_q.lora_A.weight"))
    flat = tmp_path / "flat.safetensors"
    fc.save_tensors(flat, {**tensors, key: torch.tensor(3.0)})  # no metadata: ranks come from the tensors
    assert_clean_failure(run_cli("inspect", flat), "flat.safetensors", "to_q", "2 to 5 dimensions")
    huge = tmp_path / "huge.safetensors"
    fc.save_tensors(huge, {k: v * 1e20 for k, v in tensors.items()}, meta)
    assert_clean_failure(run_cli("inspect", huge), "huge.safetensors", "beyond the float32 range")


def test_evaluation_data_rows_are_read_through_the_bounded_parser(tmp_path):
    from loramerge.errors import DataError
    from loramerge.runtime.data import read_rows

    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' + "[" * 5000 + "\n")
    with pytest.raises(DataError, match=r"row 2.*nested more than 64 levels"):
        read_rows(path)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="FIFO"):
        read_rows(fifo)


def test_quant_state_fields_of_the_wrong_type_are_corrupt_not_type_errors():
    from loramerge.io.quant import bnb4

    state = json.dumps({"quant_type": "nf4", "blocksize": [64], "dtype": "float16", "shape": [4, 4]}).encode()
    tensors = {"w.quant_state.bitsandbytes__nf4": torch.tensor(list(state), dtype=torch.uint8)}
    with pytest.raises(CorruptFile, match=r"blocksize: must be a positive integer, got \[64\]"):
        bnb4.state_from_tensors(tensors, "w")
