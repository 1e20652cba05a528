"""Latency of small calls ([37, 9] batches) on the cpu backend with torch's default threads,
optionally while a busy process holds a core (``--busy``): what the parallel_for grain policy
(``csrc/include/rmkernels/cpu_common.h``: ``grain_of``) is about. A parallel region over a few
rows costs a wake-up of the pool, and when another process holds the other cores it can wait a
scheduler slice for its workers; the mean shows that, the median does not.

    python scripts/small_call_latency.py [--busy] [--calls 400]

Prints the median, p90 and mean of each call (seconds from time.perf_counter).
"""
import argparse
import subprocess
import sys
import time

import torch

import rmkernels as rmk


def calls():
    torch.manual_seed(0)
    B, T, H = 37, 9, 64
    r, b = torch.randn(B, T), torch.randn(B)
    m = torch.rand(B, T) > 0.2
    m[:, -1] = True
    h, w, x, lp = torch.randn(B, T, H), torch.randn(1, H), torch.randn(B, 4), torch.randn(B, T)
    return {
        "remax_advantages": lambda: rmk.remax_advantages(r, b, m, backend="cpu"),
        "reinforce_pp_advantages": lambda: rmk.reinforce_pp_advantages(r, m, backend="cpu"),
        "gae": lambda: rmk.gae(r, r, m, backend="cpu"),
        "ppo_advantages": lambda: rmk.ppo_advantages(lp, lp, r, b, m, kl_coef=0.1, backend="cpu"),
        "masked_whiten": lambda: rmk.masked_whiten(r, m, backend="cpu"),
        "last_token_reward": lambda: rmk.last_token_reward(h, w, attention_mask=m, backend="cpu"),
        "ranking_loss": lambda: rmk.ranking_loss(x, backend="cpu"),
        "kl_estimate": lambda: rmk.kl_estimate(lp, lp, m, backend="cpu"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", action="store_true", help="run a busy-looping process alongside")
    ap.add_argument("--calls", type=int, default=400)
    a = ap.parse_args(argv)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if a.busy else None
    try:
        print(f"torch threads {torch.get_num_threads()}, busy process: {'yes' if busy else 'no'}")
        for name, f in calls().items():
            for _ in range(5):
                f()
            ts = []
            for _ in range(a.calls):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            ts.sort()
            print(f"{name:26s} median {ts[len(ts) // 2] * 1e3:8.4f} ms  p90 {ts[len(ts) * 9 // 10] * 1e3:8.4f} ms  "
                  f"mean {sum(ts) / len(ts) * 1e3:8.4f} ms")
    finally:
        if busy is not None:
            busy.kill()


if __name__ == "__main__":
    sys.exit(main())
