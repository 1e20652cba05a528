"""pytest configuration of the benchmark suite (``pytest benchmarks/ --benchmark-only``).

Not collected by ``pytest tests`` (CI): pyproject's testpaths is ``tests``."""
import pytest

pytest.importorskip("pytest_benchmark")


def pytest_configure(config):
    from benchmarks import timing
    timing.steady_allocator()
