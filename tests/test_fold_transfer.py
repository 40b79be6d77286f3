"""fold's device path, checked on the CPU: staging, pinning, asynchronous copies, read-ahead, dtype placement.

There is no GPU here, so the accelerator path (:class:`~loramerge.fold.transfer.DeviceTransfer`)
runs on the CPU with a staged plan, and must give the very bytes of the CPU path; on the ``meta``
device, with the allocator and the copy spied on, it must ask for pinned buffers, copy
asynchronously and send the stored dtype over the bus, converting on the device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramerge import fold
from loramerge.core.adapter import LowRank
from loramerge.errors import NonFiniteValues
from loramerge.fold import transfer as transfer_module
from loramerge.fold import writer as writer_module
from loramerge.fold.plan import Update
from loramerge.fold.streaming import BlockStream, folded_blocks
from loramerge.fold.transfer import DeviceTransfer, TransferPlan, transfer_plan
from loramerge.io.checkpoint import open_checkpoint
from loramerge.io.formats.tensorfile import write_safetensors
from tests.fold_models import make_adapter, peft_merged, save_base, tiny_llama

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CPU = torch.device("cpu")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    return {name: ckpt.read(name) for name in ckpt.tensors}


def fold_with(monkeypatch, plan: TransferPlan, *args, **kwargs):
    monkeypatch.setattr(writer_module, "transfer_plan", lambda device: plan)
    try:
        return fold(*args, device="cpu", **kwargs)
    finally:
        monkeypatch.undo()


def test_plans_by_device():
    cpu, cuda, mps = (transfer_plan(torch.device(d)) for d in ("cpu", "cuda:1", "mps"))
    assert not cpu.staged and not cpu.pinned and not cpu.non_blocking
    assert cuda.staged and cuda.pinned and cuda.non_blocking and cuda.device == torch.device("cuda", 1)
    assert mps.staged and not mps.pinned and not mps.non_blocking  # no page-locked memory: plain copies
    assert cuda.block_elements >= 16 * cpu.block_elements  # large blocks where launches and the bus cost


@pytest.mark.parametrize("dtype", ["keep", "fp16"])
def test_staged_path_gives_the_bytes_of_the_cpu_path(tmp_path, monkeypatch, dtype):
    model = tiny_llama(seed=4, dtype=torch.bfloat16)
    base = save_base(model, tmp_path / "base", max_shard_size="30KB")
    plain = make_adapter(model.float(), tmp_path / "lora", seed=3, target_modules=ALL_LINEAR)
    dora = make_adapter(model.float(), tmp_path / "dora", seed=5, target_modules=["q_proj", "down_proj"],
                        use_dora=True)
    # 96 elements per block: every weight crosses in many blocks, and the output rings wrap many times.
    for name, staged in (("cpu", False), ("staged", True)):
        fold_with(monkeypatch, TransferPlan(CPU, staged=staged, pinned=False, block_elements=96), base,
                  [plain, dora], output=tmp_path / name, dtype=dtype)
    ours, reference, original = tensors(tmp_path / "staged"), tensors(tmp_path / "cpu"), tensors(base)
    assert ours.keys() == reference.keys()
    changed = [n for n in ours if not torch.equal(ours[n], original[n].to(ours[n].dtype))]
    assert len(changed) >= 2 * len(ALL_LINEAR)
    for name in ours:
        assert ours[name].dtype == reference[name].dtype
        assert torch.equal(ours[name].view(torch.uint8), reference[name].view(torch.uint8)), name


def test_staged_path_matches_peft(tmp_path, monkeypatch):
    model = tiny_llama(seed=2)
    base = save_base(model, tmp_path / "base")
    dora = make_adapter(model, tmp_path / "dora", target_modules=["q_proj", "down_proj", "lm_head"], use_dora=True)
    plain = make_adapter(model, tmp_path / "lora", seed=7, target_modules=ALL_LINEAR)
    fold_with(monkeypatch, TransferPlan(CPU, staged=True, pinned=False, block_elements=200), base, [dora, plain],
              output=tmp_path / "out")
    ours, ref = tensors(tmp_path / "out"), peft_merged(model, [dora, plain]).state_dict()
    assert max(float((ours[n] - ref[n]).abs().max()) for n in ours) <= 2e-6


def one_tensor(tmp_path: Path, rows: int = 10, cols: int = 6, dtype: torch.dtype = torch.bfloat16):
    write_safetensors({"w": torch.randn(rows, cols).to(dtype)}, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    lowrank = LowRank(torch.randn(2, cols), torch.randn(rows, 2), scale=0.5)
    return ckpt, ckpt.tensors["w"], Update("lora", "a", "fc", 1.0, lowrank)


def test_the_next_block_is_read_before_the_last_one_is_waited_for(tmp_path, monkeypatch):
    ckpt, info, update = one_tensor(tmp_path)
    log: list[str] = []
    read_rows, finish = type(ckpt).read_rows, DeviceTransfer.finish

    def spy_read(self, name, start, stop, buffer=None):
        log.append(f"read {start}")
        return read_rows(self, name, start, stop, buffer)

    def spy_finish(self, pending):
        log.append("wait")
        return finish(self, pending)

    monkeypatch.setattr(type(ckpt), "read_rows", spy_read)
    monkeypatch.setattr(DeviceTransfer, "finish", spy_finish)
    stream = BlockStream(TransferPlan(CPU, staged=True, pinned=False, block_elements=12), torch.float32)
    # (blocks come in reused buffers, which the writer empties before it asks for more; so do we)
    out = torch.cat([block.clone() for block in folded_blocks(ckpt, info, [update], torch.bfloat16, stream)])
    # 12 elements = 2 rows per block: while block i is on the device, block i+1 is read from disk.
    assert log == ["read 0", "read 2", "wait", "read 4", "wait", "read 6", "wait", "read 8", "wait", "wait"]
    expected = (ckpt.read("w").float() + 0.5 * update.lowrank.B @ update.lowrank.A).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_accelerator_plan_pins_copies_asynchronously_and_converts_on_the_device(tmp_path, monkeypatch):
    ckpt, info, _ = one_tensor(tmp_path)
    pinned, copies = [], []
    host_buffer, to_device = transfer_module.host_buffer, transfer_module.to_device

    def spy_buffer(count, dtype, pin):
        pinned.append((dtype, pin))
        return host_buffer(count, dtype, False)  # the CPU-only build cannot page-lock memory

    def spy_copy(target, source, non_blocking):
        copies.append((source.device.type, target.device.type, source.dtype, non_blocking))
        if source.device.type == "meta":  # a meta tensor holds no data to bring back
            return target
        return to_device(target, source, non_blocking)

    monkeypatch.setattr(transfer_module, "host_buffer", spy_buffer)
    monkeypatch.setattr(transfer_module, "to_device", spy_copy)
    meta = torch.device("meta")
    transfer = DeviceTransfer(TransferPlan(meta, staged=True, pinned=True, block_elements=12), torch.float32)
    block = transfer.upload(ckpt, info, 0, 4)
    assert block.device == meta and block.dtype == torch.float32 and block.shape == (4, 6)
    # The rows crossed the bus as the stored bf16, from a pinned buffer, without waiting.
    assert copies == [("cpu", "meta", torch.bfloat16, True)]
    assert (torch.uint8, True) in pinned and all(pin for _, pin in pinned)
    transfer.upload(ckpt, info, 4, 8)
    assert copies[-1] == ("cpu", "meta", torch.bfloat16, True)
    copies.clear()
    pending = transfer.download(block, torch.bfloat16, check_finite=True)
    # The result went back already in the output dtype (converted on the device), without waiting,
    # with its finite flag beside it.
    assert copies == [("meta", "cpu", torch.bfloat16, True), ("meta", "cpu", torch.bool, True)]
    assert transfer.finish(pending).dtype == torch.bfloat16 and all(pin for _, pin in pinned)


def test_cpu_plan_never_stages(tmp_path, monkeypatch):
    ckpt, info, update = one_tensor(tmp_path)
    monkeypatch.setattr(transfer_module, "to_device", lambda *a: pytest.fail("the CPU path staged a copy"))
    stream = BlockStream(transfer_plan(CPU), torch.float32)
    assert stream.transfer is None
    blocks = list(folded_blocks(ckpt, info, [update], torch.bfloat16, stream))
    assert len(blocks) == 1 and blocks[0].shape == (10, 6)


def test_staged_overflow_to_fp16_is_refused(tmp_path):
    ckpt, info, update = one_tensor(tmp_path, dtype=torch.float32)
    update.lowrank = LowRank(torch.full((2, 6), 300.0), torch.full((10, 2), 300.0))
    stream = BlockStream(TransferPlan(CPU, staged=True, pinned=False, block_elements=12), torch.float32)
    with pytest.raises(NonFiniteValues, match="tensor w"):
        list(folded_blocks(ckpt, info, [update], torch.float16, stream))
