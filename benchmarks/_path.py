"""Make ``benchmarks`` and the source tree's ``rmkernels`` importable when a script is run
as ``python benchmarks/<script>.py`` from anywhere (the repo root goes first on sys.path)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
