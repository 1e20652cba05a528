"""The option codes of rmkernels/_codes.py and their C++ mirror csrc/include/rmkernels/codes.h
must agree: a code changed on one side only would make a kernel compute another option."""
import os
import re

import pytest

from rmkernels import _codes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "include", "rmkernels", "codes.h")

# Python enum -> (C++ enum name, C++ name of each member)
_MIRROR = {
    _codes.Reduction: ("Reduction", {"NONE": "kReduceNone", "MEAN": "kReduceMean", "SUM": "kReduceSum"}),
    _codes.KLEstimator: ("KLEstimator", {"K1": "kK1", "ABS": "kAbs", "K2": "kK2", "K3": "kK3"}),
    _codes.GaeSegmentMode: ("GaeSegmentMode", {"ROW": "kRow", "SEGMENT_AGGREGATE": "kSegmentAggregate",
                                               "SEGMENT_FINAL": "kSegmentFinal"}),
    _codes.GroupEstimator: ("GroupEstimator", {"GRPO": "kGrpo", "DR_GRPO": "kDrGrpo", "RLOO": "kRloo",
                                               "OPO": "kOpo", "GPG": "kGpg",
                                               "REINFORCE_PP_BASELINE": "kReinforcePPBaseline"}),
    _codes.GroupSingle: ("GroupSingle", {"ZERO": "kSingleZero", "SELF": "kSingleSelf"}),
}


def _header_enums():
    text = open(HEADER).read()
    enums = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*:\s*\w+\s*\{([^}]*)\}", text):
        enums[name] = {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(-?\d+)", body)}
    consts = {k: int(v) for k, v in re.findall(r"constexpr\s+int64_t\s+(\w+)\s*=\s*(\d+)", text)}
    return enums, consts


@pytest.mark.parametrize("py_enum", list(_MIRROR), ids=lambda e: e.__name__)
def test_enum_mirrored_in_header(py_enum):
    enums, _ = _header_enums()
    cpp_name, members = _MIRROR[py_enum]
    assert cpp_name in enums, f"enum {cpp_name} missing from {HEADER}"
    assert set(members) == set(py_enum.__members__), f"{py_enum.__name__}: update _MIRROR with the new members"
    expect = {members[m.name]: int(m) for m in py_enum}
    assert enums[cpp_name] == expect, f"{cpp_name} in codes.h is {enums[cpp_name]}, _codes.py says {expect}"


def test_every_header_enum_is_mirrored():
    enums, _ = _header_enums()
    assert set(enums) == {v[0] for v in _MIRROR.values()}


def test_segment_policy_mirrored():
    _, consts = _header_enums()
    assert consts["kSegmentT"] == _codes.SEGMENT_T
    assert consts["kSegmentMinRowsPerSm"] == _codes.SEGMENT_MIN_ROWS_PER_SM


def test_group_zero_policy_mirrored():
    _, consts = _header_enums()
    assert consts["kGroupZeroSample"] == _codes.GROUP_ZERO_SAMPLE
    assert consts["kGroupZeroMaxHeads"] == _codes.GROUP_ZERO_MAX_HEADS


def test_string_maps_cover_the_enums():
    assert set(_codes.REDUCTIONS.values()) == set(_codes.Reduction)
    assert set(_codes.KL_ESTIMATORS.values()) == set(_codes.KLEstimator)
    assert set(_codes.GROUP_ESTIMATORS.values()) == set(_codes.GroupEstimator)
    assert set(_codes.GROUP_SINGLES.values()) == set(_codes.GroupSingle)
