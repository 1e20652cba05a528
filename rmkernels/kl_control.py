"""KL-coefficient controllers of PPO for RLHF (Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences", section 2.2).

The coefficient ``value`` is the ``kl_coef`` of :func:`rmkernels.ppo_advantages`::

    ctl = rmk.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    out = rmk.ppo_advantages(..., kl_coef=ctl.value)
    ctl.update(current_kl=mean_kl_of_the_batch, n_steps=batch_size)

They are plain Python (the update is one scalar per PPO step): pass ``current_kl`` as a
Python float (a NumPy scalar, or a one-element tensor or array, read with ``.item()``, also does).

A NaN ``current_kl`` (a batch whose KL came out NaN) leaves the coefficient unchanged and
warns (``RuntimeWarning``): one bad batch must not make the coefficient NaN for the rest of
the run, as ``value *= 1 + clip(nan) * ...`` would. An infinite KL is a valid reading: the
error is clipped to +-0.2 as for any large KL.
"""
import math
import warnings

from rmkernels import _checks


def _number(name, value):
    """A number option by the ops' rule (:func:`rmkernels._checks.is_real`: an int, a float or
    a NumPy scalar; no bool), or here also a one-element tensor or array, read with ``.item()``
    (a measured KL often is one; the controllers run on the host once a step)."""
    if not _checks.is_real(value) and hasattr(value, "item"):
        numel = getattr(value, "numel", None)  # a tensor's method; a NumPy array's is .size
        if (numel() if callable(numel) else getattr(value, "size", None)) == 1:
            value = value.item()
    if not _checks.is_real(value):
        raise TypeError(f"{name} must be a real number (a Python float or int, a NumPy scalar or a one-element "
                        f"tensor), got {type(value).__name__}")
    return float(value)


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing (same interface as the adaptive one)."""

    def __init__(self, kl_coef):
        kl_coef = _number("kl_coef", kl_coef)
        if not math.isfinite(kl_coef) or kl_coef < 0:
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
        self.value = kl_coef

    def update(self, current_kl, n_steps):
        _number("current_kl", current_kl)
        _number("n_steps", n_steps)

    def __repr__(self):
        return f"FixedKLController(kl_coef={self.value})"


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller of the KL coefficient:

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + error * n_steps / horizon

    ``target``: the KL (nats per sequence, as measured by the caller) to hold;
    ``horizon``: how many samples it takes to correct the coefficient by a factor ~e^0.2.

    ``update`` returns the new coefficient; a NaN ``current_kl`` is skipped with a
    ``RuntimeWarning`` (the coefficient stays as it was).
    """

    def __init__(self, init_kl_coef, target, horizon):
        init_kl_coef = _number("init_kl_coef", init_kl_coef)
        target = _number("target", target)
        horizon = _number("horizon", horizon)
        if not math.isfinite(init_kl_coef) or init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be a finite number >= 0, got {init_kl_coef!r}")
        if not math.isfinite(target) or target <= 0:
            raise ValueError(f"target must be a finite number > 0, got {target!r}")
        if not math.isfinite(horizon) or horizon <= 0:
            raise ValueError(f"horizon must be a finite number > 0, got {horizon!r}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl, n_steps):
        current_kl = _number("current_kl", current_kl)
        n_steps = _number("n_steps", n_steps)
        if not math.isfinite(n_steps) or n_steps < 0:
            raise ValueError(f"n_steps must be a finite number >= 0, got {n_steps!r}")
        if math.isnan(current_kl):
            warnings.warn(f"{type(self).__name__}.update: current_kl is NaN; the KL coefficient is left at "
                          f"{self.value!r}", RuntimeWarning, stacklevel=2)
            return self.value
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def __repr__(self):
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"
