"""Quantization: int8/int4 models that are smaller and faster on a CPU, with the loss measured.

Modules: kernels (which integer matmuls this torch offers), layers (quantized Linear and
Embedding), quantize (methods applied to slm GPTs and Hugging Face causal LMs), calibrate
(input ranges for static int8), artifact (saving and loading quantized model directories).
"""
