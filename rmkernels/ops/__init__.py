"""The ops of rmkernels, one module per op family (declarations, reference, checks, public
functions); every schema in ``_schemas.py``, the ops built by ``rmkernels/_registry.py``."""
