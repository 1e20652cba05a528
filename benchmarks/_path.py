"""Make ``benchmarks`` and the source tree's ``rmkernels`` and ``rmkernels_train`` importable
when a script is run as ``python benchmarks/<script>.py`` from anywhere (the repo root and its
``python/`` directory go first on sys.path)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _dir in (os.path.join(ROOT, "python"), ROOT):
    if _dir not in sys.path:
        sys.path.insert(0, _dir)
