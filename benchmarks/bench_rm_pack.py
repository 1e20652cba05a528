"""rm-pack: end-to-end reward training (``rmkernels-train reward``), padded vs ``--packing``
in tokens/s, and ``--fsdp`` vs DDP memory per rank with 2 ranks.

    python benchmarks/bench_rm_pack.py [--quick] [--tiny] [--shapes pack fsdp]

The preference data is generated: each pair's chosen and rejected texts have log-normal
lengths (median 70 characters = tokens under the character tokenizer, sigma 1.0, cut at
2000), written as JSONL under /tmp/rm_pack/. Each measurement runs the real command on it
(the built-in Llama over a character tokenizer, the same seed and pairs for both providers):

- ``pack``: one process; tokens/s = the real (non-pad) tokens of the timed steps / their
  wall time, from ``metrics.jsonl`` (the first step is warm-up and not counted); the two
  runs alternate ``reps`` times and the median is kept. Their first losses must agree.
- ``fsdp``: ``torchrun --nproc_per_node 2`` (gloo on the CPU) with DDP and with ``--fsdp``
  (both ``--packing``, sequences <= 256 tokens: a model whose state outweighs the
  activations); from ``final.json``'s ``memory_per_rank``, the largest over the ranks: the
  model state a rank holds (parameters + gradients + AdamW state), its resident memory's peak
  by the last training step above what it was at the start (the training's own memory), and
  the process's whole peak RSS (with the Python/torch process itself, and under --fsdp the
  final HF checkpoint's whole model gathered on rank 0's CPU; on GPUs that copy is in host
  memory, not on the device).

Results (the markdown table and a CSV) go to /tmp/rm_pack/. The machine may be shared:
compare the ratios of one run, and report ``uptime`` with them.
"""
try:
    from benchmarks import _path
except ImportError:
    import _path  # noqa: F401

import csv
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

from benchmarks import common

OPS = ("rm-pack",)
OUT = "/tmp/rm_pack"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHABET = "abcdefghijklmnopqrstuvwxyz "

# name: model size, data, steps
CONFIGS = {
    "pack": {"hidden": 128, "layers": 2, "pairs": 2048, "batch": 8, "steps": 12, "reps": 2},
    # memory: a model whose state outweighs the activations (packed, sequences <= 256 tokens)
    "fsdp": {"hidden": 1024, "layers": 8, "pairs": 256, "batch": 2, "steps": 2, "reps": 1,
             "extra": ["--packing", "--max-length", "256"]},
    "pack-t": {"hidden": 32, "layers": 1, "pairs": 64, "batch": 4, "steps": 3, "reps": 1},
    "fsdp-t": {"hidden": 64, "layers": 2, "pairs": 64, "batch": 4, "steps": 1, "reps": 1,
               "extra": ["--packing", "--max-length", "256"]},
}


def lognormal_lengths(n, rng, median=70, sigma=1.0, cap=2000, floor=4):
    return [min(cap, max(floor, round(median * math.exp(rng.gauss(0.0, sigma))))) for _ in range(n)]


def write_data(path, n_pairs, seed=0):
    """A preference JSONL with log-normal text lengths; returns the lengths' summary."""
    rng = random.Random(seed)
    lengths = lognormal_lengths(2 * n_pairs, rng)
    with open(path, "w") as f:
        for i in range(n_pairs):
            text = ["".join(rng.choice(ALPHABET) for _ in range(lengths[2 * i + k])) for k in (0, 1)]
            f.write(json.dumps({"prompt": "", "chosen": text[0], "rejected": text[1]}) + "\n")
    s = sorted(lengths)
    return {"median": s[len(s) // 2], "p99": s[int(0.99 * (len(s) - 1))], "max": s[-1]}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")])}


def _train(out, data, c, *extra, torchrun=False):
    cmd = [sys.executable, "-m", "rmkernels_train", "reward"]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "rmkernels_train", "reward"]
    cmd += ["--data", data, "--eval-fraction", "0.02", "--max-length", "2048", *c.get("extra", ()), "--output-dir", out,
            "--hidden-size", str(c["hidden"]), "--layers", str(c["layers"]), "--batch-size", str(c["batch"]),
            "--max-steps", str(c["steps"]), "--eval-every", "100000", "--save-every", "100000", "--threads", "1",
            "--no-progress", "--no-plot", "--seed", "0", *extra]
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False, timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if r["split"] == "train"]
    with open(os.path.join(out, "final.json")) as f:
        final = json.load(f)
    return recs, final


def _tokens_per_s(recs):
    timed = recs[1:] if len(recs) > 1 else recs
    t0 = recs[0]["time_s"] if len(recs) > 1 else 0.0
    return sum(r["tokens"] for r in timed) / max(1e-9, timed[-1]["time_s"] - t0)


def _row(base, provider, metric, value, unit, note=""):
    return dict(base, provider=provider, metric=metric, median=value, p20=value, p80=value, unit=unit, note=note)


def run(op="rm-pack", device="cpu", shapes=None, quick=False, tiny=False, only=None, log=common.log):
    os.makedirs(OUT, exist_ok=True)
    names = shapes or ["pack", "fsdp"]
    if tiny:
        names = [n if n.endswith("-t") else n + "-t" for n in names]
    env = common.env_fields(device)
    load = os.getloadavg()
    rows = []
    for name in names:
        c = dict(CONFIGS[name])
        if quick:
            c["reps"] = 1
        data = os.path.join(OUT, f"prefs-{c['pairs']}.jsonl")
        lens = write_data(data, c["pairs"])
        dims = (f"H={c['hidden']},L={c['layers']},pairs/batch={c['batch']},steps={c['steps']},"
                f"len median={lens['median']},p99={lens['p99']},max={lens['max']}"
                + (f",{' '.join(c['extra'])}" if c.get("extra") else ""))
        base = dict(op="rm-pack", shape=name, dims=dims, dtype="fp32", mode="train", bytes=0, **env)
        note = f"loadavg {load[0]:.1f}"
        if name.startswith("pack"):
            tps = {"padded": [], "packed": []}
            first = {}
            for _ in range(c["reps"]):
                for prov, extra in (("padded", []), ("packed", ["--packing"])):
                    if only and prov not in only:
                        continue
                    recs, _ = _train(os.path.join(OUT, f"run-{name}-{prov}"), data, c, *extra)
                    tps[prov].append(_tokens_per_s(recs))
                    first[prov] = recs[0]["loss"]
            ok = len(first) < 2 or abs(first["padded"] - first["packed"]) <= 1e-4 * max(1.0, abs(first["padded"]))
            for prov, v in tps.items():
                if v:
                    rows.append(_row(base, prov, "tokens_per_s", statistics.median(v), "tok/s", note))
                    rows.append(_row(base, prov, "first_loss_matches", float(ok), "bool",
                                     f"first loss {first[prov]:.6f}"))
            if tps["padded"] and tps["packed"]:
                ratio = statistics.median(tps["packed"]) / statistics.median(tps["padded"])
                rows.append(_row(base, "packed/padded", "speedup", ratio, "x", note))
                log(f"  rm-pack {name}: tokens/s padded {statistics.median(tps['padded']):.0f}  packed "
                    f"{statistics.median(tps['packed']):.0f}  ({ratio:.2f}x){'' if ok else '  !! losses differ'}")
        else:
            mem = {}
            for prov, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
                if only and prov not in only:
                    continue
                _, final = _train(os.path.join(OUT, f"run-{name}-{prov}"), data, c, *extra, torchrun=True)
                per_rank = final["memory_per_rank"]
                for r in per_rank:  # the training's own memory: the peak by the last step above the start
                    r["train_rss_above_start_MiB"] = r["train_peak_rss_MiB"] - r["start_rss_MiB"]
                keys = ("model_state_MiB", "train_rss_above_start_MiB", "peak_rss_MiB")
                mem[prov] = {k: max(r[k] for r in per_rank) for k in keys}
                for k, v in mem[prov].items():
                    ranks = ", ".join(f"{r[k]:.0f}" for r in per_rank)
                    rows.append(_row(base, prov, k, v, "MiB", f"{note}; max over the ranks ({ranks})"))
            if len(mem) == 2:
                for k in keys:
                    rows.append(_row(base, "fsdp/ddp", k.replace("_MiB", "_ratio"), mem["fsdp"][k] / mem["ddp"][k],
                                     "x", note))
                log(f"  rm-pack {name}: per rank, DDP vs FSDP (MiB): " + ", ".join(
                    f"{k} {mem['ddp'][k]:.0f} vs {mem['fsdp'][k]:.0f}" for k in keys))
    _save(rows)
    return rows


def _save(rows):
    if not rows:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(OUT, f"rm_pack-{stamp}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(OUT, f"rm_pack-{stamp}.md"), "w") as f:
        f.write(markdown(rows) + "\n")


def markdown(rows):
    """The rows as one table (these metrics are not per-call times, so not report.markdown's)."""
    lines = ["| shape | dims | provider | metric | value | unit | note |", "|---|---|---|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['dims']} | {r['provider']} | {r['metric']} | {r['median']:.4g} | "
                     f"{r['unit']} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", choices=sorted(CONFIGS), help="default: pack fsdp")
    ap.add_argument("--providers", nargs="*", help="only these (padded, packed, ddp, fsdp)")
    ap.add_argument("--quick", action="store_true", help="one repetition")
    ap.add_argument("--tiny", action="store_true", help="the *-t smoke-test configs")
    args = ap.parse_args(argv)
    rows = run(shapes=args.shapes, quick=args.quick, tiny=args.tiny, only=args.providers)
    print(f"uptime: {os.getloadavg()}")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
