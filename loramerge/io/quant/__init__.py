"""Quantized weights in plain torch: bitsandbytes 4-bit (NF4/FP4, double quant) and LLM.int8, block-scaled FP8,
GPTQ and AWQ int4.

Each module holds one format's maths, written from its library's documented layout and checked
bit for bit against that library where it runs (see ``tests/test_quant_*.py``). Nothing here
imports bitsandbytes or any other quantization library.
"""
