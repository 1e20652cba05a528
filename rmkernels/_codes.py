"""Option codes: every option a kernel sees as an integer, defined once.

Python enums here; ``csrc/include/rmkernels/codes.h`` mirrors them for the C++ CPU and CUDA
kernels, and the Triton kernels import them as ``tl.constexpr`` values (``rmkernels/triton``).
``tests/test_codes.py`` fails when the header and this file drift apart.

The public functions take strings (``reduction="mean"``, ``kl_estimator="k3"``); the string ->
code maps below are the only place where a name becomes a code.
"""
import enum


class Reduction(enum.IntEnum):
    """How a per-pair / per-row loss is reduced."""
    NONE = 0
    MEAN = 1
    SUM = 2


class KLEstimator(enum.IntEnum):
    """Per-token KL estimators of x = logprobs - ref_logprobs."""
    K1 = 0  # x
    ABS = 1  # |x|
    K2 = 2  # 0.5 x^2
    K3 = 3  # exp(-x) - 1 + x


class GaeSegmentMode(enum.IntEnum):
    """How one program/block of the GPU GAE kernels covers a row: the whole row, or one
    segment of a long row (the segment policy: ``SEGMENT_T`` below)."""
    ROW = 0  # the whole row, carries start at 0: writes everything
    SEGMENT_AGGREGATE = 1  # a segment with zero carries: writes its aggregate only
    SEGMENT_FINAL = 2  # a segment with the carries of the segments to its right: writes everything


class GroupEstimator(enum.IntEnum):
    """Critic-free group advantage estimators (docs/ops.md, critic-free advantages)."""
    GRPO = 0  # (r - mean) / (std + eps)
    DR_GRPO = 1  # r - mean
    RLOO = 2  # (n r - sum r) / (n - 1)
    OPO = 3  # r - sum(len r) / sum(len)
    GPG = 4  # (B / count_nonzero(r)) (r - mean) / f_norm
    REINFORCE_PP_BASELINE = 5  # r - mean, whitened over all valid tokens afterwards


class GroupSingle(enum.IntEnum):
    """What a group of one response gets (docs/ops.md section 5, ``single=``)."""
    ZERO = 0  # mean 0, std 1, leave-one-out / length baseline 0: the response keeps its score (verl's loops)
    SELF = 1  # the response is its own baseline: advantage 0 (verl's rloo_vectorized, OpenRLHF's r - mean)


REDUCTIONS = {"none": Reduction.NONE, "mean": Reduction.MEAN, "sum": Reduction.SUM}

# Names the public functions accept, aliases included (verl / OpenRLHF spellings).
KL_ESTIMATORS = {"k1": KLEstimator.K1, "kl": KLEstimator.K1, "abs": KLEstimator.ABS, "k2": KLEstimator.K2,
                 "mse": KLEstimator.K2, "k3": KLEstimator.K3, "low_var_kl": KLEstimator.K3}
# verl's low_var_kl: k3 of x clamped to +-LOW_VAR_X_CLAMP, the result clamped to +-LOW_VAR_KL_CLAMP.
LOW_VAR_X_CLAMP = 20.0
LOW_VAR_KL_CLAMP = 10.0

GROUP_ESTIMATORS = {"grpo": GroupEstimator.GRPO, "dr_grpo": GroupEstimator.DR_GRPO, "rloo": GroupEstimator.RLOO,
                    "opo": GroupEstimator.OPO, "gpg": GroupEstimator.GPG,
                    "reinforce_pp_baseline": GroupEstimator.REINFORCE_PP_BASELINE}
GROUP_SINGLES = {"zero": GroupSingle.ZERO, "self": GroupSingle.SELF}

# Workspace zeroing of the GPU group-advantage kernels (the C++ mirror: codes::kGroupZeroSample,
# codes::kGroupZeroMaxHeads, where the rule is spelled out): when the first GROUP_ZERO_SAMPLE ids
# hold at most GROUP_ZERO_MAX_HEADS runs of equal ids, each run zeroes its group's statistics;
# otherwise the whole workspace is zeroed. Either is correct; the sample picks the cheaper.
GROUP_ZERO_SAMPLE = 32
GROUP_ZERO_MAX_HEADS = 8

# Segment policy of the GPU GAE kernels (CUDA and Triton): rows of at least 2 * SEGMENT_T
# positions are split into segments of SEGMENT_T when the batch has fewer than
# SEGMENT_MIN_ROWS_PER_SM rows per SM. 4096 positions = 4 steps of a row walk of 1024, enough
# work per program to amortise the 3 launches of the segmented scan; with fewer than 2 rows per
# SM the GPU would otherwise idle (gae-xl: B = 32, T = 32768 then runs 256 programs, not 32).
SEGMENT_T = 4096
SEGMENT_MIN_ROWS_PER_SM = 2


def num_gae_segments(B, T, sms, segment_t=SEGMENT_T):
    """Programs per row of the GPU GAE kernels for a [B, T] batch on a GPU with ``sms`` SMs
    (the C++ mirror: ``codes::num_gae_segments``)."""
    if T < 2 * segment_t or B >= SEGMENT_MIN_ROWS_PER_SM * sms:
        return 1
    return -(-T // segment_t)
