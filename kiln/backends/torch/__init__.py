"""The PyTorch-native CPU backend: the model step runs eagerly on oneDNN/ATen kernels (bf16 matmuls, int4 for
4-bit GGUF weights at small batches, kiln's C++ kernels in csrc/) and samples in torch (sampler.py)."""
