import os

import pytest

from . import build

REQUIRE = os.environ.get("RMKERNELS_REQUIRE_CUDA_ON_CPU", "0") == "1"


@pytest.fixture(scope="session", autouse=True)
def _cuda_headers():
    """The layer compiles bf16/fp16 through the CUDA toolkit's headers (host code only)."""
    if build.cuda_include_dir() is None:
        msg = ("CUDA toolkit headers (cuda_bf16.h) not found: the CUDA-on-CPU tests need the toolkit's include "
               "directory (no GPU, no CUDA runtime library); set CUDA_HOME")
        if REQUIRE:
            pytest.fail(msg)
        pytest.skip(msg)
