"""Low-bit weights with torchao: post-training quantization (ptq), quantization-aware training with
self-distillation (qat, distill) and the full-precision / PTQ / QAT comparison (bench)."""
