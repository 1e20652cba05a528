import os
import sys

import pytest
import torch

# In-tree runs (python setup.py build_ext --inplace) find the training package too; CI
# installs the project with `pip install -e .`, where this changes nothing.
_PYTHON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
if _PYTHON_DIR not in sys.path:
    sys.path.insert(0, _PYTHON_DIR)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, reproducible from the printed seed on failure."""
    seed = int(os.environ.get("RMKERNELS_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                item.add_report_section("call", "seed", f"RMKERNELS_TEST_SEED={v} reproduces this test's inputs")
