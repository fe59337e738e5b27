"""Quantization math (pure tensor functions): affine/non-linear primitives, observers, GPTQ, AWQ."""
