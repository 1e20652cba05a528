"""rmkernels benchmark suite (not part of the installed package).

One script per op (``bench_pooling.py``, ``bench_bt_loss.py``, ``bench_gae.py``,
``bench_e2e_reward.py``), each runnable alone; ``run.py`` runs them over the named shapes of
``/work/shared/BENCHMARKS.md`` (copied in ``shapes.py``) and writes
``results/<device>.csv`` + ``.md`` + PNG plots. ``pytest benchmarks/ --benchmark-only`` gives
quick pytest-benchmark comparisons. Nothing here asserts on a timing.
"""
