"""The device boundary: validation, placement, transfers, precision and device errors.

Two kinds of tests. Those taking the ``device`` fixture run on every available device (the CPU,
and CUDA where there is one) and compare with the CPU result within ``DEVICE_RTOL``. The others
check placement on any machine: with the ``meta`` device, with a torch function mode that
records tensors made on the CPU inside device maths (:mod:`tests.device_audit`), or with
monkeypatched device checks.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import pytest
import torch

import loramerge
from loramerge import Adapter, LowRank
from loramerge.core.devices import ExecutionContext, HostToDevice, device_errors, move, resolve_device
from loramerge.core.rank import RankPolicy, truncate_dense
from loramerge.errors import InvalidParameter, OutOfMemory
from loramerge.io.checkpoint import open_checkpoint
from loramerge.merge import engine
from loramerge.merge.methods import REGISTRY, ModuleInputs
from loramerge.merge.methods.subspace import empty_pair, zero_update
from tests.cli_helpers import assert_clean_failure, run_cli
from tests.device_audit import HostTensorAudit
from tests.fold_models import make_adapter, save_base, tiny_llama
from tests.method_fixtures import random_adapter, random_statistics

# Relative Frobenius error allowed between a float32 result on another device and the CPU's:
# different GEMM/SVD kernels round differently (about 1e-7 per operation), which moves a result
# by far less than this unless a per-entry method's threshold falls between two entries that
# differ only by rounding (TIES/breadcrumbs/DELLA; see the README's "Devices" section).
DEVICE_RTOL = 1e-4
POLICIES = [{}, {"rank": 3}, {"energy": 0.9}, {"max_error": 0.2}, {"energy": 0.99, "rank_max": 4}]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def sources() -> list[Adapter]:
    return [random_adapter(1, rank=4, scale=0.5), random_adapter(2, rank=6, scale=2.0), random_adapter(3, rank=3)]


def params_for(name: str) -> dict:
    return {"slerp": {}}.get(name, {})


def sources_for(name: str, sources: list[Adapter]) -> list[Adapter]:
    return sources[:2] if REGISTRY[name].max_sources == 2 else sources


def data_for(name: str, used: list[Adapter]) -> dict:
    """Input Grams for a data-aware method (regmean), nothing for the others."""
    return {"statistics": random_statistics(used)} if REGISTRY[name].needs_statistics else {}


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Make torch report ``count`` CUDA devices without touching any (device validation only)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# ------------------------------------------------------------------------------ device names


@pytest.mark.parametrize(("name", "fragment"), [
    ("gpu", "unknown device 'gpu'; use auto, cpu, cuda or cuda:N (an NVIDIA GPU is 'cuda')"),
    ("tpu:7", "unknown device 'tpu:7'; use auto, cpu, cuda or cuda:N"),
    ("garbage", "unknown device 'garbage'"),
    ("cuda:-1", "unknown device 'cuda:-1'"),
    ("mps", "--device mps is not supported"),
    ("meta", "meta devices are not supported"),
    ("xla:0", "xla devices are not supported"),
])
def test_unusable_device_names_are_one_line_errors(name, fragment):
    with pytest.raises(InvalidParameter) as info:
        resolve_device(name)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert info.value.parameter == "device"


def test_cuda_ordinals_are_checked_against_the_machine(monkeypatch):
    fake_gpus(monkeypatch, 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device(" CUDA ") == torch.device("cuda")
    with pytest.raises(InvalidParameter, match=r"--device cuda:7: this machine has 1 CUDA device\(s\) \(cuda:0\)"):
        resolve_device("cuda:7")
    fake_gpus(monkeypatch, 0)
    with pytest.raises(InvalidParameter, match="no CUDA device is available; use --device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_merge_fold_and_extract_check_the_device_before_reading_anything(tmp_path, monkeypatch):
    fake_gpus(monkeypatch, 1)

    def no_loading(*args, **kwargs):
        raise AssertionError("a source was loaded before the device was checked")

    monkeypatch.setattr(engine, "load", no_loading)
    missing = tmp_path / "nowhere"
    for device in ("gpu", "cuda:7"):
        with pytest.raises(InvalidParameter, match="device"):
            loramerge.merge([missing, missing], device=device)
        with pytest.raises(InvalidParameter, match="device"):
            loramerge.fold(missing, missing, output=tmp_path / "out", device=device)
        with pytest.raises(InvalidParameter, match="device"):
            loramerge.extract(missing, missing, output=tmp_path / "out", device=device)
    with pytest.raises(InvalidParameter, match="unknown dtype 'int8'"):
        loramerge.merge([missing], compute_dtype="int8")


@pytest.mark.parametrize("command", ["combine", "fold", "extract"])
@pytest.mark.parametrize("name", ["gpu", "mps", "tpu:7", "garbage", "cuda:7"])
def test_cli_device_errors_are_one_line_before_any_source_is_read(tmp_path, monkeypatch, command, name):
    fake_gpus(monkeypatch, 1)
    missing = tmp_path / "nowhere"  # would be "no such file" if the sources were read first
    args = {"combine": [missing], "fold": [missing, missing], "extract": [missing, missing]}[command]
    result = run_cli(command, *args, "-o", tmp_path / "out", "--device", name)
    assert_clean_failure(result, name)
    assert "nowhere" not in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- placement and transfers


def test_only_methods_that_use_the_accelerator_run_on_the_compute_device(sources, monkeypatch):
    """With the compute device set to ``meta``, dense methods see their factors there, factor-space methods on the CPU."""
    seen: dict[str, torch.device] = {}

    class Stop(Exception):
        pass

    for name in ("ties", "dare_linear", "svd", "tsv", "knots"):
        spec = REGISTRY[name]

        @functools.wraps(spec.function)
        def spy(inputs, name=name, **params):
            seen[name] = inputs.template.A.device
            raise Stop

        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(spec, function=spy))
    monkeypatch.setattr(engine, "execution_context",
                        lambda device, dtype: ExecutionContext(torch.device("meta"), torch.float32))
    for name in ("ties", "dare_linear", "svd", "tsv", "knots"):
        with pytest.raises(Stop):
            loramerge.merge(sources, method=name)
    assert {n: d.type for n, d in seen.items()} == {"ties": "meta", "dare_linear": "meta", "svd": "cpu",
                                                     "tsv": "cpu", "knots": "cpu"}
    assert all(m.uses_accelerator == m.dense for m in REGISTRY.values())


def test_dtype_is_converted_on_the_device_side_of_a_copy():
    calls: list[tuple[str, torch.dtype, str, torch.dtype]] = []
    original = torch.Tensor.to

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append((self.device.type, self.dtype, out.device.type, out.dtype))
        return out

    lora = LowRank(torch.ones(2, 5, dtype=torch.bfloat16), torch.ones(3, 2, dtype=torch.bfloat16),
                   magnitude=torch.ones(3, dtype=torch.bfloat16))
    torch.Tensor.to = recording
    try:
        moved = lora.to(dtype=torch.float32, device="meta")
        staged = move(torch.ones(4, dtype=torch.bfloat16), "meta", torch.float32)
    finally:
        torch.Tensor.to = original
    assert staged.device.type == "meta" and staged.dtype == torch.float32
    assert moved.A.device.type == moved.magnitude.device.type == "meta"
    assert moved.A.dtype == moved.magnitude.dtype == torch.float32
    crossing = [c for c in calls if c[0] != c[2]]
    assert crossing and all(src_dtype == out_dtype for _, src_dtype, _, out_dtype in crossing), calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("numel", [1, 7, 64, 1000])
def test_host_to_device_blocks_carry_the_stored_bytes(dtype, numel):
    source = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).to(dtype).reshape(-1, 1)
    stager = HostToDevice(torch.device("cpu"), block_bytes=24)  # many blocks, a partial last one
    out = stager.staged(source, torch.float32)
    assert out.dtype == torch.float32 and out.shape == source.shape
    assert torch.equal(out, source.to(torch.float32))
    assert all(block.numel() == 24 and block.dtype == torch.uint8 for block in stager._blocks)
    assert len(stager._blocks) == (2 if numel * source.element_size() > 24 else 1)
    on_meta = HostToDevice(torch.device("meta"), block_bytes=24)(source, torch.float32)
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float32 and on_meta.shape == source.shape


def test_extract_sends_every_weight_through_the_pinned_stager(tmp_path, monkeypatch):
    model = tiny_llama(seed=3)
    base = save_base(model, tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "ad", target_modules=["q_proj", "down_proj"])
    loramerge.fold(base, adapter, output=tmp_path / "folded")
    sent: list[torch.dtype] = []
    original = HostToDevice.__call__

    def counting(self, tensor, dtype=None):
        sent.append(tensor.dtype)
        return original(self, tensor, dtype)

    monkeypatch.setattr(HostToDevice, "__call__", counting)
    loramerge.extract(base, tmp_path / "folded", output=tmp_path / "lora", rank=4, device="cpu")
    floats = sum(info.is_float for info in open_checkpoint(base).tensors.values())
    assert len(sent) == 2 * floats


# ------------------------------------------------------- defects, checked on this machine's CPU


@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("weights", [[0.7, -0.4, 1.3], [0.0, 0.0, 0.0]], ids=["weighted", "all-zero"])
def test_no_method_makes_cpu_tensors_inside_device_maths(sources, name, weights):
    used = sources_for(name, sources)
    with HostTensorAudit() as audit:
        merged = loramerge.merge(used, method=name, weights=weights[:len(used)], device="cpu", **data_for(name, used))
        if REGISTRY[name].accepts_rank:
            loramerge.merge(used, method=name, weights=weights[:len(used)], energy=0.9, device="cpu",
                            **data_for(name, used))
    audit.assert_clean()
    if not any(weights):
        assert all(float(merged.delta(m).abs().max()) == 0.0 for m in merged.modules)


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_rank_policies_make_no_cpu_tensors(policy):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(40, 6, generator=g) @ torch.randn(6, 70, generator=g)
    with HostTensorAudit() as audit:
        truncate_dense(delta, RankPolicy(**policy))
        truncate_dense(delta.T.contiguous(), RankPolicy(**policy))
        RankPolicy(**policy).choose(torch.linalg.svdvals(delta))
    audit.assert_clean()


def test_zero_updates_are_made_on_the_factors_device():
    pairs = [(torch.ones(5, 2, device="meta", dtype=torch.float64), torch.ones(2, 3, device="meta",
                                                                              dtype=torch.float64))]
    B, A = empty_pair(pairs)
    assert (B.device.type, A.device.type, B.shape, A.shape) == ("meta", "meta", (5, 0), (0, 3))
    term = LowRank(torch.ones(2, 3, device="meta"), torch.ones(4, 2, device="meta"))
    out = zero_update(ModuleInputs("m", [term, None], [0.0, 1.0]))
    assert out.A.device.type == out.B.device.type == "meta" and out.rank == 1


@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("compute", ["bf16", "fp16"])
def test_half_precision_compute_decomposes_in_float32(sources, name, compute):
    """bf16/fp16 compute reached LAPACK's NotImplementedError; decompositions now run in float32."""
    used = sources_for(name, sources)
    data = data_for(name, used)
    reference = loramerge.merge(used, method=name, device="cpu", **data)
    merged = loramerge.merge(used, method=name, device="cpu", compute_dtype=compute, **data)
    # Factor-space results stay within a few units of the format's rounding (2⁻⁸ for bf16, 2⁻¹¹
    # for fp16). Per-entry methods select entries by magnitude or sign, and entries near a
    # threshold flip with that rounding: a few per cent of ΔW (measured: up to 9 % after re-ranking).
    tolerance = 0.1 if REGISTRY[name].dense else 8 * {"bf16": 2**-8, "fp16": 2**-11}[compute]
    for module in reference.modules:
        assert relative(merged.delta(module), reference.delta(module)) < tolerance, module


def test_truncating_a_half_precision_update_keeps_float32_factors():
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(30, 4, generator=g) @ torch.randn(4, 50, generator=g)).to(torch.bfloat16)
    t = truncate_dense(delta, RankPolicy(max_error=0.01))
    assert t.B.dtype == t.A.dtype == torch.float32 and t.A.shape[0] == 4
    assert t.relative_error < 0.01


# ------------------------------------------------------------------------- device errors


def test_out_of_memory_names_the_module_and_what_to_do(sources, monkeypatch, tmp_path):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(engine, "finalize", exhausted)
    with pytest.raises(OutOfMemory) as info:
        loramerge.merge(sources, device="cpu")
    assert isinstance(info.value, MemoryError) and info.value.module == "layer.q"
    assert "module layer.q: cpu ran out of memory allocating 2.00 GiB" in str(info.value)
    for i, adapter in enumerate(sources):
        adapter.save(tmp_path / f"s{i}")
    result = run_cli("combine", tmp_path / "s0", tmp_path / "s1", "-o", tmp_path / "out", "--device", "cpu")
    assert_clean_failure(result, "module layer.", "cpu ran out of memory allocating 2.00 GiB")


def test_cuda_out_of_memory_advice():
    advice = "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, or run with --device cpu"
    with pytest.raises(OutOfMemory, match=advice), device_errors(torch.device("cuda:0"), module="model.up_proj"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 172.00 MiB")


def test_unsupported_dtype_says_which_compute_dtype_to_use(sources, monkeypatch):
    def unsupported(*args, **kwargs):
        raise NotImplementedError("\"geqrf_cuda\" not implemented for 'BFloat16'")

    monkeypatch.setattr(engine, "finalize", unsupported)
    with pytest.raises(InvalidParameter) as info:
        loramerge.merge(sources, device="cpu")
    assert info.value.parameter == "compute_dtype" and info.value.module == "layer.q"
    assert "use --compute-dtype fp32" in str(info.value)


def test_other_runtime_errors_pass_through():
    with pytest.raises(RuntimeError, match="something else"), device_errors(torch.device("cpu"), module="m"):
        raise RuntimeError("something else")


def test_extract_names_the_module_that_ran_out_of_memory(tmp_path, monkeypatch):
    model = tiny_llama(seed=4)
    base = save_base(model, tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "ad", target_modules=["q_proj"])
    loramerge.fold(base, adapter, output=tmp_path / "folded")

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(sys.modules["loramerge.extract"], "_decompose", exhausted)
    with pytest.raises(OutOfMemory, match=r"module model\.layers\.0\.self_attn\.q_proj: cpu ran out of memory"):
        loramerge.extract(base, tmp_path / "folded", output=tmp_path / "lora", rank=2, device="cpu")
    assert not (tmp_path / "lora").exists()


# ---------------------------------------------------- every device against the CPU (gpu marker)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_method_on_each_device_matches_the_cpu(sources, device, name):
    used = sources_for(name, sources)
    data = data_for(name, used)
    reference = loramerge.merge(used, method=name, weights=[0.7, -0.4, 1.3][:len(used)], device="cpu", **data)
    merged = loramerge.merge(used, method=name, weights=[0.7, -0.4, 1.3][:len(used)], device=device, **data)
    for module in reference.modules:
        assert merged[module].A.device.type == "cpu"
        assert relative(merged.delta(module), reference.delta(module)) < DEVICE_RTOL, module
    # The method itself on the device, whether or not the engine would send it there.
    spec = REGISTRY[name]
    terms = [a.layers["layer.up"].to(dtype=torch.float32, device=device) for a in used]
    grams = data["statistics"].for_module("layer.up") if data else None
    out = spec.function(ModuleInputs("layer.up", terms, [0.7, -0.4, 1.3][:len(used)], seed=5,
                                     statistics=[g.to(device) for g in grams] if grams else None),
                        **spec.resolve({}, sources=len(used)))
    cpu = spec.function(ModuleInputs("layer.up", [t.to(device="cpu") for t in terms], [0.7, -0.4, 1.3][:len(used)],
                                     seed=5, statistics=grams), **spec.resolve({}, sources=len(used)))
    dense = [getattr(r, "delta", r) for r in (out, cpu)]
    dense = [d.product().reshape(d.matrix_shape) if isinstance(d, LowRank) else d for d in dense]
    assert dense[0].device.type == device.type
    assert relative(dense[0], dense[1]) < DEVICE_RTOL


@pytest.mark.parametrize("policy", POLICIES[1:], ids=str)
def test_each_rank_policy_on_each_device_matches_the_cpu(sources, device, policy):
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(60, 8, generator=g) @ torch.randn(8, 90, generator=g)
    here = truncate_dense(delta.to(device), RankPolicy(**policy))
    cpu = truncate_dense(delta, RankPolicy(**policy))
    assert here.A.shape == cpu.A.shape and here.A.device.type == device.type
    assert relative(here.B @ here.A, cpu.B @ cpu.A) < DEVICE_RTOL
    assert abs(here.relative_error - cpu.relative_error) < 1e-4
    S = torch.linalg.svdvals(delta)
    assert RankPolicy(**policy).choose(S.to(device)) == RankPolicy(**policy).choose(S)
    merged = loramerge.merge(sources, method="ties", device=device, **policy)
    reference = loramerge.merge(sources, method="ties", device="cpu", **policy)
    assert [merged[m].rank for m in merged.modules] == [reference[m].rank for m in reference.modules]


def test_dare_masks_are_the_same_on_every_device(sources, device):
    spec = REGISTRY["dare_linear"]
    kept = []
    for where in (device, torch.device("cpu")):
        terms = [a.layers["layer.q"].to(dtype=torch.float32, device=where) for a in sources[:1]]
        out = spec.function(ModuleInputs("layer.q", terms, [1.0], seed=11), **spec.resolve({}, sources=1))
        kept.append((out.delta != 0).cpu())
    assert torch.equal(kept[0], kept[1])


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_fold")
    model = tiny_llama(seed=5)
    base = save_base(model, root / "base")
    adapters = [make_adapter(model, root / f"ad{i}", seed=i + 1, target_modules=["q_proj", "v_proj", "down_proj"])
                for i in range(2)]
    return base, adapters


def test_fold_on_each_device_matches_the_cpu(tmp_path, folded, device):
    base, adapters = folded
    # Methods without value thresholds: their results differ across devices by rounding only.
    for method, extra in (("linear", {}), ("svd", {"rank": 4}), ("dare_linear", {"rank": 4})):
        outputs = {}
        for where in dict.fromkeys((str(device), "cpu")):
            out = tmp_path / f"{method}-{where}"
            loramerge.fold(base, adapters, output=out, method=method, device=where, **extra)
            ckpt = open_checkpoint(out)
            outputs[str(where)] = {name: ckpt.read(name).double() for name in ckpt.tensors}
        here, cpu = outputs[str(device)], outputs["cpu"]
        assert here.keys() == cpu.keys() and len(cpu) > 10
        for name in cpu:
            assert torch.allclose(here[name], cpu[name], rtol=1e-5, atol=1e-6), name


def test_extract_on_each_device_matches_the_cpu(tmp_path, folded, device):
    base, adapters = folded
    loramerge.fold(base, adapters[0], output=tmp_path / "ft")
    results = {str(where): loramerge.extract(base, tmp_path / "ft", output=tmp_path / f"x-{where}", energy=0.999,
                                             device=where).adapter for where in dict.fromkeys((str(device), "cpu"))}
    here, cpu = results[str(device)], results["cpu"]
    assert here.modules == cpu.modules
    for module in cpu.modules:
        assert here[module].rank == cpu[module].rank
        assert relative(here.delta(module), cpu.delta(module)) < DEVICE_RTOL, module


@pytest.mark.gpu
def test_host_to_device_round_trip_on_cuda():
    source = torch.randn(3, 1_000_003).to(torch.bfloat16)
    stager = HostToDevice(torch.device("cuda"), block_bytes=1 << 20)
    out = stager(source, torch.float32)
    assert out.device.type == "cuda" and torch.equal(out.cpu(), source.float())
    assert all(block.is_pinned() for block in stager._blocks)
    stager.close()
