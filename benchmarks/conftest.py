"""pytest configuration of the benchmark suite (``pytest benchmarks/ --benchmark-only``).

Not collected by ``pytest tests`` (CI): pyproject's testpaths is ``tests``."""
import pytest

pytest.importorskip("pytest_benchmark")


def pytest_configure(config):
    import os

    import torch

    from benchmarks import timing
    timing.steady_allocator()
    if os.environ.get("RMKERNELS_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["RMKERNELS_BENCH_THREADS"]))
