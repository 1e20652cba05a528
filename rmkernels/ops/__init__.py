"""The ops of rmkernels, one module per op family (schemas, reference, fakes, autograd,
public functions)."""

from rmkernels.ops import _kernels_gae  # noqa: F401,E402  (gae_kernel / kl_estimate_kernel schemas)
