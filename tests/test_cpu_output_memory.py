"""The C++ CPU kernels make every [B, T] output, and pooling's backward its [B, T, H] gradient of
the hidden states, through ``OutputPages`` (csrc/cpu/memory.cpp):
while a call writes a large output that is not resident yet (a fresh block: a new mmap, or heap
pages malloc_trim returned), the block is advised for transparent huge pages, so that its first
stores fault in huge pages rather than 4 KiB ones; the advice is withdrawn once it is written.
Checked in a child process on outputs of 40 MiB, each made right after ``malloc_trim(0)`` (the
benchmarks' "fresh pages"), from /proc/self/smaps: where the advice applies (Linux, THP mode
``madvise``, torch's own THP_MEM_ALLOC_ENABLE unset) the mapping that holds the output is backed
by huge pages (AnonHugePages; or the kernel counted a fallback to 4 KiB pages, no huge page
being free then) and carries the withdrawal (``nh``, MADV_NOHUGEPAGE), not the
advice (``hg``); elsewhere, and with RMKERNELS_HUGE_PAGES=0, it carries neither. The values are
the reference's. ``rmkernels._C.advise_huge_pages`` (the rule, for memory the caller holds)
advises a fresh block and leaves a resident one alone; ``_C.huge_pages()`` and ``python -m
rmkernels.info`` say whether the advice is on, and why not."""
import json
import os
import subprocess
import sys

import pytest
from utils import subprocess_env

_CHILD = r"""
import ctypes, json, sys
import torch
import rmkernels as rmk
from rmkernels import _ext

trim = ctypes.CDLL("libc.so.6").malloc_trim

torch.set_num_threads(1)
B, T = 81920, 128  # 40 MiB of float32
g = torch.Generator().manual_seed(0)
mask = torch.rand(B, T, generator=g) > 0.2
x, y, v = (torch.randn(B, T, generator=g) for _ in range(3))
scores = torch.randn(B, generator=g)
ids = torch.arange(B) // 8


def mapping(t):
    # (VmFlags, AnonHugePages in kB) of the mapping that holds the middle of t (madvise splits
    # a block's mapping: its unaligned ends keep the old flags).
    addr = t.data_ptr() + t.numel() * t.element_size() // 2
    inside, huge = False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                huge = int(line.split()[1])
            elif inside and head == "VmFlags:":
                return line.split()[1:], huge
    raise AssertionError("no mapping holds the output")


calls = {
    "group_advantages": lambda be: rmk.group_advantages(scores, ids, mask, backend=be).advantages,
    "reinforce_pp_advantages": lambda be: rmk.reinforce_pp_advantages(x, mask, backend=be).advantages,
    "gae": lambda be: rmk.gae(x, v, mask, gamma=0.99, lam=0.95, backend=be)[0],
    "kl_estimate": lambda be: rmk.kl_estimate(x, y, mask, estimator="k3", backend=be),
    "masked_whiten": lambda be: rmk.masked_whiten(x, mask, backend=be),
    "ppo_advantages": lambda be: rmk.ppo_advantages(x, y, v, scores, mask, kl_coef=0.05, whiten=False,
                                                    backend=be).advantages,
    "last_token_reward grad_hidden": lambda be: pooled_grad(be),
}
# pooling's backward: grad_hidden [8, 1280, 1024] (40 MiB), zeroed and written at one row a sequence
hidden = torch.randn(8, 1280, 1024, generator=g)
head = torch.randn(1, 1024, generator=g)
lengths = torch.randint(1, 1281, (8,), generator=g)


def pooled_grad(be):
    h = hidden.clone().requires_grad_()  # resident (copied into): only the gradient is fresh
    trim(0)
    rmk.last_token_reward(h, head, lengths=lengths, backend=be).sum().backward()
    return h.grad


def fallbacks():
    # huge page faults the kernel could not serve with a huge page (no free one): 4 KiB pages
    with open("/proc/vmstat") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("thp_fault_fallback "))


out = {}
for name, call in calls.items():
    trim(0)  # every free page back to the system: the output is fresh (a new mmap, or emptied heap pages)
    before = fallbacks()
    got = call("cpu")
    assert got.shape == ((B, T) if got.dim() == 2 else hidden.shape) and got.is_contiguous(), (name, got.shape)
    flags, huge_kb = mapping(got)
    # a host with no free huge page at that moment falls back to 4 KiB pages: counted, not our fault
    out[name] = {"hg": "hg" in flags, "nh": "nh" in flags, "huge pages": huge_kb > 0 or fallbacks() > before}
    torch.testing.assert_close(got, call("reference"), rtol=1e-4, atol=1e-4, equal_nan=True, msg=name)
    del got
# The same rule for memory the caller holds (the benchmarks' floor): a fresh block is advised,
# a resident one (written once) is left alone.
trim(0)
block = torch.empty(B, T)
fresh = _ext._C.advise_huge_pages(block.data_ptr(), block.nbytes)
flags, _ = mapping(block)
block.fill_(1.0)
withdrawn = _ext._C.advise_huge_pages(block.data_ptr(), block.nbytes, False)
out["_C.advise_huge_pages"] = {"fresh": fresh, "hg": "hg" in flags, "withdrawn": withdrawn,
                               "resident": _ext._C.advise_huge_pages(block.data_ptr(), block.nbytes)}
out["_C.huge_pages"] = _ext._C.huge_pages()
print(json.dumps(out))
"""


def _advice_applies():
    """Where csrc/cpu/memory.cpp gives the advice to the child (torch's THP_MEM_ALLOC_ENABLE unset): THP
    mode madvise."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[madvise]" in f.read() and os.path.exists("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
    except OSError:
        return False


@pytest.mark.parametrize("switch", [None, "1", "0"])
def test_large_fresh_outputs_are_written_in_huge_pages(switch):
    """RMKERNELS_HUGE_PAGES unset or 1: the advice where it applies; 0: never."""
    # torch's own advice (THP_MEM_ALLOC_ENABLE) is not ours; RMKERNELS_HUGE_PAGES unset for None
    env = subprocess_env(THP_MEM_ALLOC_ENABLE=None, RMKERNELS_HUGE_PAGES=switch)
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    on = _advice_applies() and switch != "0"
    assert seen.pop("_C.advise_huge_pages") == {"fresh": on, "hg": on, "withdrawn": on, "resident": False}
    size, why = seen.pop("_C.huge_pages")
    assert (size > 0) == on and (why == "") == on, (size, why)
    if switch == "0":
        assert why == "RMKERNELS_HUGE_PAGES=0"
    info = subprocess.run([sys.executable, "-m", "rmkernels.info"], capture_output=True, text=True, env=env,
                          timeout=300)
    line = next(x for x in info.stdout.splitlines() if x.startswith("C++ CPU outputs in huge pages:"))
    assert line.startswith("C++ CPU outputs in huge pages: yes" if on else f"C++ CPU outputs in huge pages: no ({why})")
    assert seen == {name: {"hg": False, "nh": on, "huge pages": on} for name in seen}, seen
