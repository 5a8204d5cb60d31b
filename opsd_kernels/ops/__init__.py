"""Triton kernels and their launchers, one file per op."""
