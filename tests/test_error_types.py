"""The error classes: the builtins they also are, their one-line messages, their fields, their export.

Complements ``test_errors.py`` (which checks that each bad input gets a clear message) by
checking what a Python user's ``except`` clause and code see.
"""

from __future__ import annotations

import errno
import inspect
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramerge
from loramerge import errors
from loramerge.merge.methods import MergeMethod, Param
from tests.peft_fixtures import make_peft_adapter

BUILTINS = {
    errors.SourceNotFound: (FileNotFoundError,),
    errors.ConfigNotFound: (FileNotFoundError,),
    errors.OutputExists: (FileExistsError,),
    errors.WriteFailed: (OSError,),
    errors.HubError: (OSError,),
    errors.PickleRefused: (PermissionError,),
    errors.CorruptFile: (ValueError,),
    errors.UnknownFormat: (ValueError,),
    errors.UnsupportedAdapter: (ValueError,),
    errors.IncompatibleAdapters: (ValueError,),
    errors.InvalidParameter: (ValueError,),
    errors.RecipeError: (ValueError,),
    errors.NonFiniteValues: (ValueError, ArithmeticError),
    errors.OutOfMemory: (MemoryError,),
    errors.MissingDependency: (ImportError,),
    errors.DataError: (ValueError,),
    errors.UnsupportedModel: (ValueError,),
    errors.VerificationFailed: (AssertionError,),
}
ERRNOS = {errors.SourceNotFound: errno.ENOENT, errors.ConfigNotFound: errno.ENOENT, errors.OutputExists: errno.EEXIST,
          errors.PickleRefused: errno.EPERM}


def error_classes() -> list[type[errors.LoramergeError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, errors.LoramergeError) and c is not errors.LoramergeError]


def test_every_class_has_its_builtin_and_is_documented():
    assert set(error_classes()) == set(BUILTINS)
    for cls, builtins in BUILTINS.items():
        assert issubclass(cls, errors.LoramergeError) and issubclass(cls, builtins), cls
        assert cls.__name__ in errors.__doc__


@pytest.mark.parametrize("cls", list(BUILTINS), ids=lambda c: c.__name__)
def test_message_stays_one_line_and_fields_survive_pickling(cls):
    exc = cls("a/b.safetensors: something is wrong", path="a/b.safetensors", module="layer.q", parameter="rank")
    assert str(exc) == exc.message == "a/b.safetensors: something is wrong"
    assert exc.fields == {"path": "a/b.safetensors", "module": "layer.q", "parameter": "rank"}
    if isinstance(exc, OSError):
        # OSError would print "[Errno 2] …: 'a/b.safetensors'" from errno/filename; the message wins.
        assert exc.errno == ERRNOS.get(cls) and exc.filename == "a/b.safetensors"
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is cls and str(copy) == str(exc) and copy.fields == exc.fields
    assert getattr(copy, "filename", None) == getattr(exc, "filename", None)
    bare = cls("just a message")
    assert str(bare) == "just a message" and bare.fields == {"path": None, "module": None, "parameter": None}


def test_every_class_is_exported_from_the_package():
    for cls in [errors.LoramergeError, errors.LoramergeWarning, *error_classes()]:
        assert getattr(loramerge, cls.__name__) is cls and cls.__name__ in loramerge.__all__
    assert issubclass(loramerge.LoramergeWarning, UserWarning)


def test_builtin_except_clauses_catch_real_failures(tmp_path, llama, llama_adapters):
    try:
        loramerge.load(tmp_path / "nowhere")
    except FileNotFoundError as exc:
        assert exc.errno == errno.ENOENT and exc.path == str(tmp_path / "nowhere") and "nowhere" in str(exc)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError) as info:
        loramerge.load(llama_adapters["plain"]).save(tmp_path / "full")
    assert info.value.path == str(tmp_path / "full")
    try:
        loramerge.merge([llama_adapters["plain"]], method="nope")
    except ValueError as exc:
        assert isinstance(exc, loramerge.InvalidParameter) and exc.parameter == "method"
    folder = make_peft_adapter(llama, tmp_path / "pkl", r=2, lora_alpha=2, target_modules=["q_proj"])
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(PermissionError) as refused:
        loramerge.load(folder)
    assert refused.value.errno == errno.EPERM and refused.value.path == str(folder)


def test_readers_and_the_merge_engine_fill_the_fields(tmp_path, llama_adapters):
    folder = shutil.copytree(llama_adapters["plain"], tmp_path / "cut")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(loramerge.CorruptFile) as corrupt:
        loramerge.load(folder)
    assert corrupt.value.path == str(folder)

    wide = shutil.copytree(llama_adapters["plain"], tmp_path / "wide")
    tensors = load_file(wide / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(40, 4)
    save_file(tensors, wide / "adapter_model.safetensors")
    with pytest.raises(loramerge.IncompatibleAdapters) as mismatch:
        loramerge.merge([llama_adapters["plain"], wide])
    assert mismatch.value.module == "model.layers.0.self_attn.q_proj"
    assert mismatch.value.path == str(wide)

    huge = loramerge.Adapter({"fc": loramerge.LowRank(torch.full((1, 4), 3e38), torch.full((3, 1), 3e38))})
    with pytest.raises(loramerge.NonFiniteValues) as overflow:
        loramerge.merge([huge, huge], weights=[1e10, 1e10], device="cpu")
    assert overflow.value.module == "fc" and isinstance(overflow.value, ArithmeticError)

    cases = [({"rank": 0}, "rank"), ({"energy": 2.0}, "energy"), ({"weights": [1.0]}, "weights"),
             ({"device": "gpu"}, "device"), ({"method": "ties", "density": 2.0}, "density"),
             ({"method": "cat", "rank": 4}, "rank"), ({"method": "ties", "nonsense": 1}, "nonsense")]
    for kwargs, parameter in cases:
        with pytest.raises(loramerge.InvalidParameter) as bad:
            loramerge.merge([llama_adapters["plain"], llama_adapters["same_rank"]], **kwargs)
        assert bad.value.parameter == parameter, kwargs


def test_overrides_keep_the_fields_and_add_the_module(llama_adapters):
    with pytest.raises(loramerge.InvalidParameter) as info:
        loramerge.merge([llama_adapters["plain"], llama_adapters["same_rank"]], method="ties",
                        overrides=lambda module: {"density": 3.0})
    assert info.value.parameter == "density" and info.value.module is not None
    assert str(info.value).startswith(f"module {info.value.module}: ")


def test_with_context_and_fill():
    exc = errors.SourceNotFound("x: missing", parameter="source")
    new = exc.with_context("y: missing", path="y")
    assert type(new) is errors.SourceNotFound and str(new) == "y: missing"
    assert new.fields == {"path": "y", "module": None, "parameter": "source"} and new.filename == "y"
    assert exc.fill(path="x", parameter="other") is exc
    assert exc.path == "x" and exc.parameter == "source" and exc.filename == "x"


def test_method_parameters_must_match_the_function_keywords():
    def scaled(inputs, *, lambda_: float, density: float):
        return inputs

    lam, density = Param("lambda_", 1.0, float, "scale"), Param("density", 0.5, float, "kept")
    assert MergeMethod("ok", scaled, "s", "f", "p", params=(density, lam)).name == "ok"
    for params in [(lam,), (lam, density, Param("gamma", 0.1, float, "g")), (Param("lamda", 1.0, float, "x"), density),
                   (lam, lam)]:
        with pytest.raises(TypeError, match="method 'bad': scaled\\(\\) takes keyword argument"):
            MergeMethod("bad", scaled, "s", "f", "p", params=params)

    def anything(inputs, **params):
        return inputs

    with pytest.raises(TypeError, match="exactly one keyword argument per Param"):
        MergeMethod("loose", anything, "s", "f", "p", params=(lam,))
    with pytest.raises(TypeError):
        MergeMethod("none", lambda: None, "s", "f", "p")
