"""Which weights should a QLoRA adapter be folded into? A measured comparison on a small Llama.

A QLoRA adapter was trained against the 4-bit base, dequant(quant(W)), not against W. This script
builds a small Llama (bf16), quantizes it the way QLoRA does (transformers + bitsandbytes, NF4),
trains a LoRA on the 4-bit model for a few steps (PEFT, so the adapter is a real QLoRA adapter),
and compares each way of folding it with the model it was trained as, the 4-bit base plus the
unmerged adapter:

- ``W16``: ``loramerge fold`` into the original bf16 weights (what a plain merge does);
- ``dequant(quant(W))``: ``loramerge fold --base-quant nf4`` (bf16 output);
- ``... --quantize nf4``: the same, written as a 4-bit checkpoint;
- ``PEFT 4-bit merge``: PEFT's ``merge_and_unload`` on the 4-bit model (dequantize, add, re-quantize).

Reported per choice: relative error of the logits, mean KL divergence of the next-token
distributions, and top-1 agreement, on held-out random token sequences.

    python benchmarks/qlora_fold_choice.py [--device cpu] [--steps 30]
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="where the models run (bitsandbytes must support it)")
    parser.add_argument("--steps", type=int, default=30, help="training steps of the QLoRA adapter")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="loramerge-qlora-"))
    try:
        run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    import loramerge

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         vocab_size=1024, max_position_embeddings=128, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "base")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)

    def four_bit():
        return AutoModelForCausalLM.from_pretrained(str(root / "base"), quantization_config=bnb, dtype=torch.bfloat16,
                                                    device_map=args.device)

    # Train a LoRA on the 4-bit base: fit the bf16 model's next-token distribution (distillation), the
    # setting where the adapter learns to undo part of the quantization error, as QLoRA fine-tunes do.
    teacher = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32).to(args.device).eval()
    student = get_peft_model(four_bit(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        batch = torch.randint(0, config.vocab_size, (8, 32), generator=g).to(args.device)
        with torch.no_grad():
            target = torch.log_softmax(teacher(batch).logits.float(), -1)
        logits = student(batch).logits.float()
        loss = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), target, log_target=True, reduction="batchmean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    student.save_pretrained(str(root / "adapter"))

    tokens = torch.randint(0, config.vocab_size, (16, 48), generator=torch.Generator().manual_seed(7)).to(args.device)

    def logits_of(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(tokens).logits.float()

    reference = logits_of(PeftModel.from_pretrained(four_bit(), str(root / "adapter")))
    choices = {}
    loramerge.fold(root / "base", root / "adapter", output=root / "w16")
    choices["fold into W16 (plain merge)"] = root / "w16"
    loramerge.fold(root / "base", root / "adapter", output=root / "dq", base_quant="nf4")
    choices["fold into dequant(quant(W)) (--base-quant nf4)"] = root / "dq"
    loramerge.fold(root / "base", root / "adapter", output=root / "dq4", base_quant="nf4", quantize="nf4")
    choices["... written 4-bit (--quantize nf4)"] = root / "dq4"
    results = {}
    for label, folder in choices.items():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, device_map=args.device)
        results[label] = logits_of(model)
    peft_merged = PeftModel.from_pretrained(four_bit(), str(root / "adapter")).merge_and_unload()
    results["PEFT merge_and_unload on the 4-bit model"] = logits_of(peft_merged)
    results["4-bit base without the adapter"] = logits_of(four_bit())
    results["bf16 base without the adapter"] = logits_of(copy.deepcopy(teacher).to(torch.bfloat16))

    print(f"Llama {args.hidden}×{args.layers} layers, NF4 (blocksize 64), LoRA r=16 on all linear layers, "
          f"{args.steps} QLoRA steps; reference: 4-bit base + unmerged adapter; device {args.device}")
    print(f"{'fold choice':<50} {'rel. logits err':>15} {'mean KL':>10} {'top-1 agree':>12}")
    ref_logp = torch.log_softmax(reference, -1)
    for label, logits in results.items():
        rel = float((logits - reference).norm() / reference.norm())
        logp = torch.log_softmax(logits, -1)
        kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        agree = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
        print(f"{label:<50} {rel:>15.4f} {kl:>10.5f} {agree:>12.1%}")


if __name__ == "__main__":
    main()
