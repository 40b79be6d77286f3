"""Folding a kohya LoRA into a single-file SDXL checkpoint: loramerge against the in-memory approach.

Writes a synthetic SDXL-shaped single file (fp16, SGM/LDM names: the UNet's Linear and Conv2d
weights and biases, CLIP-L and OpenCLIP-G with fused ``in_proj_weight``; ~6.7 GB; no VAE) and a
kohya LoRA shaped like kohya's default SDXL network (rank 32 on every UNet attention, projection
and feed-forward Linear and every text-encoder Linear: 986 modules, so q/k/v of OpenCLIP-G are
row slices of ``in_proj_weight``), then folds it three ways, each in its own process (peak RSS
from ``os.wait4``, as in benchmarks/fold.py):

- ``floor``: safetensors ``load_file`` + ``save_file`` of the checkpoint (the I/O floor of any
  tool that holds the model in memory);
- ``in-memory``: what kohya's ``sdxl_merge_lora.py`` and ComfyUI's checkpoint save do, reduced to
  its core: ``load_file``, add ``scale·up@down`` (float32) into each target tensor (or its rows),
  ``save_file``;
- ``loramerge``: ``loramerge.fold.engine(checkpoint, lora, output=...)`` (streamed).

    python benchmarks/fold_sd.py                    # 3 repeats
    python benchmarks/fold_sd.py --repeats 1 --keep /tmp/sdxl-bench
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's loramerge, also in children

from benchmarks.fold import measure

UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer."
TE2 = "conditioner.embedders.1.model."
_LORA_LEAVES = (".to_q", ".to_k", ".to_v", ".to_out.0", ".proj_in", ".proj_out", ".ff.net.0.proj", ".ff.net.2")


def checkpoint_tensors() -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the synthetic SDXL single file, in file order."""
    from loramerge.io.formats.sd_names import SDXL_UNET, clip_modules, unet_modules

    out: list[tuple[str, tuple[int, ...]]] = []
    for _, ldm, shape in unet_modules(SDXL_UNET):
        out += [(f"{UNET}{ldm}.weight", shape), (f"{UNET}{ldm}.bias", (shape[0],))]
    out.append((f"{TE1}text_model.embeddings.token_embedding.weight", (49408, 768)))
    for path, shape in clip_modules(768, 12, 3072):
        out += [(f"{TE1}{path}.weight", shape), (f"{TE1}{path}.bias", (shape[0],))]
    out.append((f"{TE2}token_embedding.weight", (49408, 1280)))
    for i in range(32):
        block = f"{TE2}transformer.resblocks.{i}."
        out += [(block + "attn.in_proj_weight", (3840, 1280)), (block + "attn.in_proj_bias", (3840,)),
                (block + "attn.out_proj.weight", (1280, 1280)), (block + "attn.out_proj.bias", (1280,)),
                (block + "mlp.c_fc.weight", (5120, 1280)), (block + "mlp.c_fc.bias", (5120,)),
                (block + "mlp.c_proj.weight", (1280, 5120)), (block + "mlp.c_proj.bias", (1280,))]
    out.append((f"{TE2}text_projection", (1280, 1280)))
    return out


def write_checkpoint(path: Path) -> None:
    from loramerge.io.shards import OutEntry, ShardWriter

    tensors = checkpoint_tensors()
    g = torch.Generator().manual_seed(0)
    with ShardWriter(path, [OutEntry(n, "F16", s) for n, s in tensors], {"modelspec.architecture": "sdxl"}) as w:
        for name, shape in tensors:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            w.write(name, (torch.randn(shape, generator=g) / math.sqrt(fan_in)).to(torch.float16))


def write_lora(path: Path, rank: int) -> int:
    """kohya's default SDXL network: UNet attention/projection/ff Linears and all text-encoder Linears."""
    from safetensors.torch import save_file

    from loramerge.io.formats.sd_names import ARCHITECTURES

    arch = ARCHITECTURES["sdxl"]
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for module, shape in arch.shapes.items():
        if len(shape) != 2 or (module.startswith("unet.") and not module.endswith(_LORA_LEAVES)):
            continue
        name = arch.preferred[module]
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, shape[1], generator=g) / math.sqrt(shape[1])).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(shape[0], rank, generator=g) * 0.01).half()
        tensors[f"{name}.alpha"] = torch.tensor(16.0)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": "16"})
    return len(tensors) // 3


def child(kind: str, checkpoint: str, lora: str, out: str, device: str = "auto") -> None:
    started = time.perf_counter()
    from safetensors.torch import load_file, save_file

    if kind == "floor":
        save_file(load_file(checkpoint), out)
    elif kind == "in-memory":
        from loramerge import load
        from loramerge.io.names import as_targets
        from loramerge.io.single_file import SingleFileResolver

        state = load_file(checkpoint)
        adapter = load(lora)
        resolve = SingleFileResolver({k: tuple(v.shape) for k, v in state.items()})
        for module, lr in adapter.layers.items():
            delta = lr.product(torch.float32)
            for target in as_targets(resolve(f"{module}.weight", state.keys())) or []:
                weight = state[target.name]
                if target.transposed:
                    weight.copy_((weight.float() + delta.T).to(weight.dtype))
                    continue
                rows = slice(target.start, target.start + (target.size or delta.shape[0]))
                part = delta[target.source:target.source + (target.size or delta.shape[0])]
                weight[rows] = (weight[rows].float() + part.reshape(weight[rows].shape)).to(weight.dtype)
        save_file(state, out)
    elif kind == "loramerge":
        import loramerge

        loramerge.fold(checkpoint, lora, output=out, device=device)
    else:
        raise SystemExit(f"unknown child {kind}")
    print(json.dumps({"seconds": time.perf_counter() - started}))


def compare(ours: Path, theirs: Path) -> str:
    from safetensors import safe_open

    worst, differing, count = 0.0, 0, 0
    with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
        for name in a.keys():  # noqa: SIM118 (safe_open has no __iter__)
            x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
            ulp = y.abs().clamp_min(2.0**-14) * 2.0**-10
            worst = max(worst, float(((x - y).abs() / ulp).max()))
            differing += int((x != y).sum())
            count += x.numel()
    return f"loramerge vs in-memory: {differing / count:.4%} of entries differ, worst {worst:.2f} fp16 ulp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--keep", help="build the inputs here and keep them (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--lora", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto",
                        help="loramerge's compute device: auto (CUDA when available, else CPU), cpu, cuda[:N]")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.checkpoint, args.lora, args.out, args.device)
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="loramerge-fold-sd-"))
    root.mkdir(parents=True, exist_ok=True)
    checkpoint, lora = root / "sdxl.safetensors", root / "lora.safetensors"
    started = time.perf_counter()
    if not checkpoint.is_file():
        write_checkpoint(checkpoint)
    modules = write_lora(lora, args.rank)
    print(f"SDXL-shaped single file {checkpoint.stat().st_size / 1e9:.2f} GB fp16, kohya LoRA rank {args.rank} on "
          f"{modules} modules ({lora.stat().st_size / 1e6:.0f} MB); inputs ready in {time.perf_counter() - started:.0f}s")
    kinds = ["floor", "in-memory", "loramerge"]
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    try:
        for repeat in range(args.repeats):
            for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
                out = root / f"{kind}.safetensors"
                out.unlink(missing_ok=True)
                argv = [sys.executable, __file__, "--child", kind, "--checkpoint", str(checkpoint), "--lora", str(lora),
                        "--out", str(out), "--device", args.device]
                results[kind].append(measure(argv))
                print(f"  repeat {repeat + 1} {kind:10s} {results[kind][-1]['seconds']:6.1f}s "
                      f"peak RSS {results[kind][-1]['rss_gb']:.2f} GB", flush=True)
        print(compare(root / "loramerge.safetensors", root / "in-memory.safetensors"))
        print("| contender | seconds (median) | peak RSS (max) |\n|---|---|---|")
        for kind in kinds:
            seconds = statistics.median(r["seconds"] for r in results[kind])
            rss = max(r["rss_gb"] for r in results[kind])
            print(f"| {kind} | {seconds:.1f} | {rss:.2f} GB |")
        ratios = [m["seconds"] / ours["seconds"] for m, ours in zip(results["in-memory"], results["loramerge"])]
        floor = [f["seconds"] / ours["seconds"] for f, ours in zip(results["floor"], results["loramerge"])]
        print(f"in-memory / loramerge time: median {statistics.median(ratios):.2f}x; "
              f"floor / loramerge: median {statistics.median(floor):.2f}")
    finally:
        for kind in kinds:
            (root / f"{kind}.safetensors").unlink(missing_ok=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
