"""Every backend's implementation of an op: Triton kernels and their launchers, the native
launcher, the PyTorch form (divergence_torch.py, the CPU fallback)."""
