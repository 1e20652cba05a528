"""The ops of rmkernels, one module per op family (schemas, reference, fakes, autograd,
public functions)."""
