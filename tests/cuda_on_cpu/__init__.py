"""CUDA-on-CPU execution layer: runs csrc/cuda's kernels on the CPU in the tests (emu.py)."""
