"""Triton kernels of rmkernels (imported lazily: only when the ``triton`` backend runs).

Under ``TRITON_INTERPRET=1`` (set before triton is imported) they run on CPU tensors, which
is how CI tests them without a GPU.
"""
