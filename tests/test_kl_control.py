"""The KL controllers (``rmk.AdaptiveKLController``, ``rmk.FixedKLController``): Ziegler et al.
2019, as TRL and OpenRLHF implement them."""
import math

import pytest
import torch

import rmkernels as rmk


def test_adaptive_kl_controller():
    ctl = rmk.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    assert ctl.value == 0.2
    ctl.update(current_kl=6.0 * 1.1, n_steps=256)  # 10% over target: error 0.1
    assert math.isclose(ctl.value, 0.2 * (1 + 0.1 * 256 / 10000))
    v = ctl.value
    ctl.update(current_kl=100.0, n_steps=512)  # clipped to +0.2
    assert math.isclose(ctl.value, v * (1 + 0.2 * 512 / 10000))
    v = ctl.value
    ctl.update(current_kl=torch.tensor(0.0), n_steps=512)  # clipped to -0.2, tensors accepted
    assert math.isclose(ctl.value, v * (1 - 0.2 * 512 / 10000))
    with pytest.raises(ValueError, match="target"):
        rmk.AdaptiveKLController(0.1, 0.0, 100)
    with pytest.raises(ValueError, match="horizon"):
        rmk.AdaptiveKLController(0.1, 1.0, -5)
    import numpy as np

    for bad in ("big", True, torch.tensor([1.0, 2.0]), torch.tensor(True), np.array([1.0, 2.0]), None):
        with pytest.raises(TypeError, match="current_kl must be a real number"):
            ctl.update(bad, 1)
    v = ctl.value
    ctl.update(np.float32(0.0), np.int64(512))  # NumPy scalars, a one-element array or tensor: numbers
    ctl.update(np.array([0.0]), torch.tensor([512]))
    assert math.isclose(ctl.value, v * (1 - 0.2 * 512 / 10000) ** 2)
    for bad in (-1, math.nan, math.inf):  # a step count is a finite count
        with pytest.raises(ValueError, match="n_steps"):
            ctl.update(1.0, bad)


def test_fixed_kl_controller():
    ctl = rmk.FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    with pytest.raises(ValueError, match="kl_coef"):
        rmk.FixedKLController(-1.0)
    assert rmk.FixedKLController(0.0).value == 0.0  # no KL penalty: allowed (the docs' ">= 0")
    with pytest.raises(ValueError, match="kl_coef"):
        rmk.FixedKLController(float("nan"))
