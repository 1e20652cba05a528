"""verl's PPO advantage and KL functions, backed by the fused ops.

Replace the import and keep the calls::

    # from verl.trainer.ppo.core_algos import compute_gae_advantage_return, kl_penalty
    from rmkernels.integrations.verl import compute_gae_advantage_return, kl_penalty

(and the critic-free estimators, ``compute_grpo_outcome_advantage`` and the others of
:mod:`rmkernels.integrations.verl_critic_free`, all in ``__all__``).
To make verl's own trainer use them without editing verl, call :func:`patch_verl` in its
driver process (it replaces them in ``verl.trainer.ppo.core_algos`` and its estimator registry).

Same names, arguments (positional and keyword, same defaults) and numbers as
``verl.trainer.ppo.core_algos`` of **verl 0.9.1** (the version compared, function by function,
on random inputs with holes, empty rows, infinities and every option), computed by
:func:`rmkernels.ppo_advantages` in one fused pass (no Python loop over the response
length). ``import rmkernels.integrations.verl`` does not import verl. As in verl, the
tensors may have any shapes that broadcast together (``[B, T]`` with ``[1, T]``; 0-d tensors
for ``kl_penalty``), and ``gamma``/``lam`` may be floats, numpy scalars or 1-element tensors.

Where the numbers differ from verl's, on purpose:

* positions where ``response_mask`` is 0 get advantage 0 and return 0. verl leaves
  don't-care values there (the whitened advantage carried over from the next valid
  token, and that advantage plus the value); every verl loss masks those positions. What
  they hold is never read: a NaN or inf reward or value there leaves the others as they are,
  where verl's whitening sums it (``x * mask``) and every output becomes NaN.
* a batch with at most one valid token gets zero advantages, where verl's
  ``masked_whiten`` raises ``ValueError`` (the fused op never synchronises with the host
  to look at the count).
* outputs are float32 for float32, bf16 and fp16 inputs and float64 for float64 ones (verl
  keeps the input dtype); ``kl_penalty`` returns the inputs' dtype, as verl does (bf16/fp16
  inputs: computed in float32 and rounded once, where verl rounds after every step).
* ``response_mask`` marks a position valid where it is non-zero: a fractional value (0.5)
  counts as 1 here, where verl's ``* response_mask`` weights by it (verl builds 0/1 masks).
* settings verl computes with but the fused op refuses, with a ``ValueError`` / ``TypeError``
  that names them: ``lam`` outside [0, 1], a negative or non-finite ``gamma``, integer
  tensors of rewards, values or log-probs.
* a ``response_mask`` that broadcasts (``[1, T]`` for ``[B, T]`` rewards): verl's whitening
  divides by the un-broadcast mask's count (``mask.sum()``), so its mean and variance are off
  by the broadcast factor; the adapter counts every valid position of the broadcast batch.
* the ``"+"`` KL forms where ``logprob - ref_logprob`` is infinite: verl returns NaN there
  (``inf - inf`` in its straight-through ``b - b.detach() + f``), the adapter the estimator's
  value (with k2's gradient, infinite there as in verl).
* a NaN ``current_kl`` given to ``AdaptiveKLController.update`` leaves the coefficient as it
  was (with a ``RuntimeWarning``); verl's becomes NaN for the rest of the run.
"""
import math
import warnings

import torch

import rmkernels as rmk
from rmkernels.integrations import verl_critic_free as _critic_free
from rmkernels.integrations._rl import (
    as_float,
    fused_kl,
    needs_grad,
    result_dtype,
    straight_through,
    token_reward_gae,
)
from rmkernels.integrations.verl_critic_free import *  # noqa: F403  (the critic-free estimators)
from rmkernels.kl_control import _number

__all__ = ["compute_gae_advantage_return", "kl_penalty", "kl_penalty_forward", "KL_PENALTIES",
           "AdaptiveKLController", "FixedKLController", "get_kl_controller", "patch_verl", "unpatch_verl",
           "PATCHED_ESTIMATORS", *_critic_free.__all__]

VERL_VERSION_CHECKED = "0.9.1"

# verl's names -> the fused op's estimator. verl's "k3" is its "low_var_kl" (k3 of the log
# ratio clamped to +-20, the result clamped to +-10); the fused op's "low_var_kl" is exactly that.
_FUSED_ESTIMATOR = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "low_var_kl",
                    "k3": "low_var_kl"}
KL_PENALTIES = tuple(_FUSED_ESTIMATOR) + tuple(k + "+" for k in _FUSED_ESTIMATOR)


def _broadcast(**tensors):
    """verl's arithmetic broadcasts its arguments: so do we (views, no copies)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors.values()))
    except RuntimeError:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())
        raise ValueError(f"the shapes of {shapes} do not broadcast together") from None
    return [t.expand(shape) for t in tensors.values()]


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl's GAE (``AdvantageEstimator.GAE``): mask-aware recurrence, whitened advantages.

    Args:
        token_level_rewards: ``[bs, response_length]`` per-token rewards (the score at the
            last valid token minus the KL penalty, as verl's ``apply_kl_penalty`` builds them).
        values: ``[bs, response_length]`` critic values.
        response_mask: ``[bs, response_length]``, 1 at tokens the policy generated; 0 after
            EOS and at observation/tool tokens inside a multi-turn response (skipped: the
            recurrence goes from one valid token to the next).
        gamma, lam: floats, numpy scalars or 1-element tensors.

    The three tensors may broadcast (``values`` ``[1, T]``, ...) as in verl; the broadcast
    shape must be 2-D.

    Returns:
        ``(advantages, returns)``, float32 ``[bs, response_length]``: the advantages whitened
        over every valid token of the batch (unbiased variance, eps 1e-8), the returns
        ``A + V`` before whitening; both 0 where ``response_mask`` is 0.
    """
    rewards, values, mask = _broadcast(token_level_rewards=token_level_rewards, values=values,
                                       response_mask=response_mask)
    if rewards.dim() != 2:
        raise ValueError(f"token_level_rewards, values and response_mask must broadcast to 2-D [bs, response_length], "
                         f"got {tuple(rewards.shape)}")
    out = token_reward_gae(rewards, values, mask, gamma=as_float("gamma", gamma), lam=as_float("lam", lam),
                           whiten=True, unbiased=True)
    return out.advantages, out.returns


def _parse(kl_penalty):
    if not isinstance(kl_penalty, str):
        raise TypeError(f"kl_penalty must be a str, one of {KL_PENALTIES}, got {type(kl_penalty).__name__}")
    straight = kl_penalty.endswith("+")
    base = kl_penalty[:-1] if straight else kl_penalty
    if base == "full":
        raise NotImplementedError("kl_penalty='full' needs the logits of the whole vocabulary (verl does not "
                                  "implement it either)")
    if base not in _FUSED_ESTIMATOR:
        raise NotImplementedError(f"kl_penalty must be one of {KL_PENALTIES}, got {kl_penalty!r}")
    return base, straight


def _torch_forward(logprob, ref_logprob, base):
    """verl's forward estimators as differentiable torch ops (the gradient path)."""
    if base in ("kl", "k1"):
        return logprob - ref_logprob
    if base == "abs":
        return (logprob - ref_logprob).abs()
    if base in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    """verl's ``kl_penalty_forward``: the value of the estimator, with the gradient of that
    estimator. As in verl, only the plain names: a ``"+"`` form (``"k3+"``) raises
    ``NotImplementedError`` here too (verl's ``kl_penalty`` strips the suffix before calling it)."""
    base, straight = _parse(kl_penalty)
    if straight:
        raise NotImplementedError(f"kl_penalty_forward: kl_penalty={kl_penalty!r} is a straight-through form; "
                                  f"kl_penalty_forward takes the plain name ({base!r}), as verl's does, and "
                                  f"kl_penalty takes both")
    return _kl(logprob, ref_logprob, base, straight=False)


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl's per-token KL estimate between the policy and the reference, any (broadcastable)
    shapes, 0-d included.

    ``kl_penalty``: ``"kl"``/``"k1"`` = log p - log q; ``"abs"``; ``"mse"``/``"k2"`` =
    0.5 (log p - log q)^2; ``"low_var_kl"``/``"k3"`` = Schulman's k3 with the log ratio
    clamped to +-20 and the result to +-10. A trailing ``"+"`` (``"k3+"``, ``"k1+"``,
    ``"abs+"``, ...) is verl's straight-through form: the value of the estimator, the gradient
    of k2 (unbiased for the KL's gradient) -- for use as a loss (``use_kl_loss``). Where
    ``logprob - ref_logprob`` is infinite, verl's ``"+"`` forms give NaN (its ``inf - inf``);
    the adapter gives the estimator's value. Both must be tensors (verl's annotation; a Python
    number, which verl's arithmetic would take, is a ``TypeError`` here).

    The value comes from the fused op; when an input requires grad, the gradient is that of
    verl's formula (of k2 for the ``"+"`` forms), so the KL loss trains as in verl.
    """
    base, straight = _parse(kl_penalty)
    return _kl(logprob, ref_logprob, base, straight=straight and base not in ("mse", "k2"))


def _kl(logprob, ref_logprob, base, *, straight):
    lp, ref = _broadcast(logprob=logprob, ref_logprob=ref_logprob)
    dtype = result_dtype(logprob, ref_logprob)
    shape = lp.shape
    flat = (1, 1) if lp.dim() == 0 else (math.prod(shape[:-1]), shape[-1])
    value = fused_kl(lp.reshape(flat), ref.reshape(flat), _FUSED_ESTIMATOR[base]).reshape(shape).to(dtype)
    if not needs_grad(logprob, ref_logprob):
        return value
    if straight:
        g = 0.5 * (logprob - ref_logprob).square()
    else:
        g = _torch_forward(logprob, ref_logprob, base)
    return straight_through(value, g)


class AdaptiveKLController(rmk.AdaptiveKLController):
    """verl's ``AdaptiveKLController(init_kl_coef, target_kl, horizon)`` (Ziegler et al.):
    ``rmk.AdaptiveKLController``'s update under verl's argument names; ``.value`` is the
    coefficient. Accepts the settings verl's accepts (any finite real numbers; a negative
    coefficient or target included) except those that make verl's ``update`` divide by zero
    (``target_kl == 0``, ``horizon == 0``), refused here with a ``ValueError``. A NaN
    ``current_kl`` is skipped with a warning (verl's coefficient would become NaN). ``update``
    returns the new coefficient (verl's returns None) and keeps ``.value`` a Python float (verl's
    becomes a numpy float after an update); it takes what ``rmk.AdaptiveKLController.update``
    takes, so a negative ``n_steps``, which verl would apply, is a ``ValueError``."""

    def __init__(self, init_kl_coef, target_kl, horizon):
        values = {"init_kl_coef": init_kl_coef, "target_kl": target_kl, "horizon": horizon}
        for name, v in values.items():
            v = values[name] = _number(name, v)
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        for name in ("target_kl", "horizon"):
            if values[name] == 0:
                raise ValueError(f"{name} must be non-zero (verl's update divides by it)")
        self.value, self.target, self.horizon = values["init_kl_coef"], values["target_kl"], values["horizon"]


class FixedKLController(rmk.FixedKLController):
    """verl's ``FixedKLController(kl_coef)``: any finite real coefficient (verl checks none);
    ``update`` takes anything and does nothing, as verl's."""

    def __init__(self, kl_coef):
        kl_coef = _number("kl_coef", kl_coef)
        if not math.isfinite(kl_coef):
            raise ValueError(f"kl_coef must be a finite number, got {kl_coef!r}")
        self.value = kl_coef

    def update(self, current_kl, n_steps):
        pass


def get_kl_controller(kl_ctrl):
    """verl's factory: ``kl_ctrl.type`` is ``"fixed"`` (``kl_coef``) or ``"adaptive"``
    (``kl_coef``, ``target_kl``, ``horizon`` > 0)."""
    if kl_ctrl.type == "fixed":
        return FixedKLController(kl_coef=kl_ctrl.kl_coef)
    if kl_ctrl.type == "adaptive":
        horizon = _number("kl_ctrl.horizon", kl_ctrl.horizon)
        if not horizon > 0:
            raise ValueError(f"kl_ctrl.horizon must be > 0, got {kl_ctrl.horizon!r}")
        return AdaptiveKLController(init_kl_coef=kl_ctrl.kl_coef, target_kl=kl_ctrl.target_kl, horizon=kl_ctrl.horizon)
    raise NotImplementedError(f"kl_ctrl.type must be 'fixed' or 'adaptive', got {kl_ctrl.type!r}")


# verl's advantage-estimator registry names (``AdvantageEstimator`` values) -> the drop-in of the
# same name here; verl 0.9.1 registers its function of that name under each of them. Not here:
# gdpo, grpo_passk, optimal_token_baseline, tir_optimal_token_baseline (verl's own stay).
PATCHED_ESTIMATORS = {
    "gae": "compute_gae_advantage_return",
    "grpo": "compute_grpo_outcome_advantage",
    "grpo_vectorized": "compute_grpo_vectorized_outcome_advantage",
    "rloo": "compute_rloo_outcome_advantage",
    "rloo_vectorized": "compute_rloo_vectorized_outcome_advantage",
    "opo": "compute_opo_outcome_advantage",
    "gpg": "compute_gpg_outcome_advantage",
    "reinforce_plus_plus": "compute_reinforce_plus_plus_outcome_advantage",
    "reinforce_plus_plus_baseline": "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "remax": "compute_remax_outcome_advantage",
}
# core_algos attributes replaced besides the estimators: the in-reward KL of apply_kl_penalty
_PATCHED_FUNCTIONS = ("kl_penalty",)
_ORIGINALS = {}  # ("attr" | "registry", name) -> verl's object, while patched


def _core_algos():
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as e:
        raise ImportError(f"patch_verl needs verl (checked against verl {VERL_VERSION_CHECKED}: "
                          f"pip install verl=={VERL_VERSION_CHECKED}); importing it failed: {e}") from e
    return core_algos


def patch_verl():
    """Make a running verl trainer compute its advantages with these drop-ins, without editing
    verl: in ``verl.trainer.ppo.core_algos``, the functions of :data:`PATCHED_ESTIMATORS` (which
    ``ray_trainer.compute_advantage`` calls by module attribute for GAE and GRPO) and their
    entries in ``ADV_ESTIMATOR_REGISTRY`` (which it reads for every other estimator) become
    this module's functions of the same names, and ``core_algos.kl_penalty`` (``apply_kl_penalty``,
    the KL in the reward) this module's ``kl_penalty``. ::

        import rmkernels.integrations.verl as rmk_verl
        rmk_verl.patch_verl()      # in the driver, before the trainer's fit()

    In verl the advantages are computed in the driver (the single controller), so patching the
    driver process is enough; Ray workers are other processes and keep verl's functions (the
    KL loss of ``use_kl_loss`` runs there). Modules that imported a name from ``core_algos``
    before the patch keep the object they imported, as with any monkeypatch. A registry entry
    that is not verl's own function (a user's ``register_adv_est`` override) is left as it is.
    Patching twice is a no-op; :func:`unpatch_verl` restores verl's functions. Returns the
    registry names now served by rmkernels. A verl other than 0.9.x gets a ``UserWarning`` (the
    drop-ins follow 0.9.1's signatures and numbers)."""
    core_algos = _core_algos()
    import verl

    version = getattr(verl, "__version__", "unknown")
    if not str(version).startswith("0.9."):
        warnings.warn(f"rmkernels' verl drop-ins follow verl {VERL_VERSION_CHECKED}; this is verl {version}: "
                      "check their signatures against it", UserWarning, stacklevel=2)
    this = globals()
    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    for name in (*PATCHED_ESTIMATORS.values(), *_PATCHED_FUNCTIONS):
        current = getattr(core_algos, name)
        if current is not this[name]:
            _ORIGINALS[("attr", name)] = current
            setattr(core_algos, name, this[name])
    served = []
    for key, name in PATCHED_ESTIMATORS.items():
        current = registry.get(key)
        if current is this[name]:
            served.append(key)
        elif current is not None and current is _ORIGINALS.get(("attr", name)):
            _ORIGINALS[("registry", key)] = current
            registry[key] = this[name]
            served.append(key)
    return served


def unpatch_verl():
    """Undo :func:`patch_verl`: verl's own functions back in ``core_algos`` and its registry
    (an entry changed since the patch is left as it is). A no-op when not patched."""
    if not _ORIGINALS:
        return
    core_algos = _core_algos()
    this = globals()
    for (kind, name), original in list(_ORIGINALS.items()):
        if kind == "attr":
            if getattr(core_algos, name, None) is this[name]:
                setattr(core_algos, name, original)
        elif core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is this[PATCHED_ESTIMATORS[name]]:
            core_algos.ADV_ESTIMATOR_REGISTRY[name] = original
    _ORIGINALS.clear()
