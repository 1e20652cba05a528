"""rm-pack: end-to-end reward training (``rmkernels-train reward``), padded vs ``--packing``
in tokens/s, and ``--fsdp`` vs DDP memory per rank with 2 ranks.

    python benchmarks/run.py --ops rm-pack         # the committed results (minutes; opt-in)
    python benchmarks/bench_rm_pack.py [--quick] [--tiny] [--shapes pack fsdp]   # scratch

The preference data is generated: each pair's chosen and rejected texts have log-normal
lengths (median 70 characters = tokens under the character tokenizer, sigma 1.0, cut at
2000), written as JSONL into a new temporary directory ``/tmp/rm_pack-*`` (logged: it also
holds each run's output directory, and no two benchmark processes share it). Each measurement
runs the real command on it
(the built-in Llama over a character tokenizer, the same seed and pairs for both providers):

- ``pack``: one process; tokens/s = the real (non-pad) tokens of the timed steps / their
  wall time, from ``metrics.jsonl`` (the first step is warm-up and not counted); the two
  runs alternate ``reps`` times and the median is kept. Their first losses must agree.
- ``fsdp``: ``torchrun --nproc_per_node 2`` (gloo on the CPU) with DDP and with ``--fsdp``
  (both ``--packing``, sequences <= 256 tokens), from ``final.json``'s ``memory_per_rank``,
  each figure the largest over the ranks: the peak live tensor memory per rank over the
  training steps (the device-memory measure, what a GPU's ``max_memory_allocated`` counts:
  torch's CPU allocator's live bytes, from a second run of each with ``--profile-memory``,
  :mod:`rmkernels_train.memory`; what it is made of: :func:`live_components`); the model
  state a rank holds (parameters +
  gradients + AdamW state); its resident memory by the last training step above what it was
  at the start (the training's own memory, with the runtime's and the modules' share);
  the process's whole peak RSS (with the Python/torch process itself, and the end's final
  checkpoint: under --fsdp rank 0 gathers the whole model on its CPU for
  ``model.safetensors``). Then what makes up the resident memory, from the RSS marks the
  trainer records (:func:`components`). Both runs use glibc's fixed mmap threshold
  (``MALLOC_ENV``): a freed tensor leaves the resident memory, as it leaves a GPU's
  allocated memory, instead of staying in malloc's heap.

:func:`write_results` writes ``rm-pack-<machine>.json`` (date, machine, command, load
average, every row with both sides of each ratio) and ``.md`` (:func:`summary`, the table
docs/reward-training.md shows: ``scripts/readme_figures.py`` generates it from the JSON).
"""
try:
    from benchmarks import _path
except ImportError:
    import _path  # noqa: F401

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

from benchmarks import common, timing

OPS = ("rm-pack",)
OUT = "/tmp/rm_pack"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHABET = "abcdefghijklmnopqrstuvwxyz "
# The memory runs: glibc malloc serves every block above 128 KiB with mmap and returns it to the
# system when it is freed (a fixed threshold: glibc otherwise raises it to 32 MiB after the
# first large free and keeps later tensors' memory in its heap), so that the resident memory
# follows the live tensors. The same for DDP and FSDP; the tokens/s runs do not set it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
RESULTS = "rm-pack-{slug}"  # benchmarks/results/rm-pack-<machine>.json / .md

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


def _env(extra=None):
    return {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {}),
            "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")])}


def _train(out, data, c, *extra, torchrun=False, env=None):
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
    run = subprocess.run(cmd, env=_env(env), capture_output=True, text=True, check=False, timeout=3600)
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


def _row(base, provider, metric, value, unit, note="", samples=None):
    """A tidy row; with ``samples`` (the values of the repeated runs) their median, p20 and p80,
    else ``value`` for all three (one run, or a ratio of medians)."""
    med, p20, p80 = timing.quantiles(samples) if samples else (value, value, value)
    return dict(base, provider=provider, metric=metric, median=med, p20=p20, p80=p80, unit=unit, note=note)


def run(op="rm-pack", device="cpu", shapes=None, quick=False, tiny=False, only=None, log=common.log, work=None):
    """The rows of the named configs (default ``pack`` and ``fsdp``); data and runs go to
    ``work`` (default: a new temporary directory)."""
    import tempfile

    work = work or tempfile.mkdtemp(prefix="rm_pack-")
    log(f"  rm-pack: data and runs in {work}")
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
        data = os.path.join(work, f"prefs-{c['pairs']}.jsonl")
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
                    recs, _ = _train(os.path.join(work, f"run-{name}-{prov}"), data, c, *extra)
                    tps[prov].append(_tokens_per_s(recs))
                    first[prov] = recs[0]["loss"]
            ok = len(first) < 2 or abs(first["padded"] - first["packed"]) <= 1e-4 * max(1.0, abs(first["padded"]))
            for prov, v in tps.items():
                if v:
                    rows.append(_row(base, prov, "tokens_per_s", None, "tok/s", f"{note}; {len(v)} run(s)", samples=v))
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
                _, final = _train(os.path.join(work, f"run-{name}-{prov}"), data, c, *extra, torchrun=True,
                                  env=MALLOC_ENV)
                per_rank = [{**r, **components(r)} for r in final["memory_per_rank"]]
                # the live tensor bytes: a run of its own with --profile-memory (the profiler's own memory
                # stays out of the RSS figures above)
                _, live = _train(os.path.join(work, f"run-{name}-{prov}-live"), data, c, *extra, "--profile-memory",
                                 str(c["steps"]), torchrun=True, env=MALLOC_ENV)
                for r, lr in zip(per_rank, live["memory_per_rank"]):
                    r.update(live_components(lr))
                mem[prov] = {k: max(r[k] for r in per_rank) for k in HEADLINE + COMPONENTS + LIVE}
                for k, v in mem[prov].items():
                    ranks = ", ".join(f"{r[k]:.0f}" for r in per_rank)
                    rows.append(_row(base, prov, k, v, "MiB", f"{note}; max over the ranks ({ranks})"))
            if len(mem) == 2:
                for k in HEADLINE:
                    rows.append(_row(base, "fsdp/ddp", k.replace("_MiB", "_ratio"), mem["fsdp"][k] / mem["ddp"][k],
                                     "x", note))
                log(f"  rm-pack {name}: per rank, DDP vs FSDP (MiB): " + ", ".join(
                    f"{k} {mem['ddp'][k]:.0f} vs {mem['fsdp'][k]:.0f}" for k in HEADLINE))
    return rows


# The memory figures of a run (from final.json's memory_per_rank), MiB, each the largest over the ranks.
# The first is the device-memory measure the <= 0.6x target is judged on (on a GPU: the allocator's
# max_memory_allocated; here torch's CPU allocator's live bytes, --profile-memory).
HEADLINE = ("peak_live_tensors_MiB", "model_state_MiB", "train_rss_above_start_MiB", "peak_rss_MiB")
# What the live tensor bytes are made of (the --profile-memory run's live_tensors).
LIVE = ("live_at_first_step_MiB", "held_at_first_step_MiB", "live_between_steps_MiB", "live_step_peak_over_MiB")
COMPONENTS = ("params_MiB", "optimizer_state_MiB", "ddp_buckets_MiB", "start_rss_MiB", "model_build_MiB",
              "model_build_peak_MiB", "first_forward_MiB", "between_steps_MiB", "step_peak_over_steady_MiB",
              "end_peak_over_train_MiB")
LABELS = {
    "peak_live_tensors_MiB": "peak live tensor memory per rank, the device-memory measure",
    "live_at_first_step_MiB": "live as the first step begins (all tensors allocated since the start and alive)",
    "held_at_first_step_MiB": "of which the training state: parameters held, buffers, DDP's gradient buckets",
    "live_between_steps_MiB": "live as the last step begins (that state and AdamW's)",
    "live_step_peak_over_MiB": "a step's peak above that (gradients, activations, FSDP's gathered layers, AdamW's "
                               "temporaries)",
    "model_state_MiB": "model state: parameters + gradients + AdamW state",
    "train_rss_above_start_MiB": "resident memory by the last step, above the start",
    "peak_rss_MiB": "peak resident memory of the process (the end's checkpoint included)",
    "params_MiB": "parameters held (float32)",
    "optimizer_state_MiB": "AdamW state held",
    "ddp_buckets_MiB": "DDP's gradient buckets (its own copy of the gradients, kept between steps)",
    "start_rss_MiB": "the process at the start (Python, torch, transformers; before data and model)",
    "model_build_MiB": "the built model, resident (parameters held, modules imported; DDP: and its wrapper)",
    "model_build_peak_MiB": "the build's peak above the data (DDP: its first broadcast of the weights)",
    "first_forward_MiB": "the first micro-batch's forward (the activations autograd keeps)",
    "between_steps_MiB": "resident after the last step, above the data (weights, AdamW, DDP's gradient buckets, "
                         "modules)",
    "step_peak_over_steady_MiB": "a step's peak above that (gradients, activations, FSDP's gathered layers)",
    "end_peak_over_train_MiB": "the end's peak above the training's (final evaluation, checkpoint; FSDP rank 0: "
                               "the gathered model)",
}


def components(r):
    """What makes up a rank's resident memory, MiB, from its RSS marks (``rss_marks_MiB``:
    ``now`` = resident at the mark, ``peak`` = the process's peak so far) and report."""
    m = r["rss_marks_MiB"]
    last = m.get("last_step") or m["step1"]
    return {"train_rss_above_start_MiB": r["train_peak_rss_MiB"] - r["start_rss_MiB"],
            "params_MiB": r["params_MiB"], "optimizer_state_MiB": r["optimizer_state_MiB"],
            "ddp_buckets_MiB": r.get("ddp_buckets_MiB", 0.0),
            "start_rss_MiB": m["start"]["now"],
            "model_build_MiB": m["model"]["now"] - m["data"]["now"],
            "model_build_peak_MiB": m["model"]["peak"] - m["data"]["peak"],
            "first_forward_MiB": m["step1_after_forward"]["now"] - m["step1_before_forward"]["now"],
            "between_steps_MiB": last["now"] - m["data"]["now"],
            "step_peak_over_steady_MiB": r["train_peak_rss_MiB"] - last["now"],
            "end_peak_over_train_MiB": r["peak_rss_MiB"] - r["train_peak_rss_MiB"]}


def live_components(r):
    """What makes up a rank's live tensor bytes, MiB, from ``live_tensors`` (a
    ``--profile-memory`` run's memory report)."""
    lt = r["live_tensors"]
    held = lt["held_at_first_step_MiB"]
    return {"peak_live_tensors_MiB": r["peak_live_tensors_MiB"],
            "live_at_first_step_MiB": lt["at_step_start_MiB"][0],
            "held_at_first_step_MiB": held["params"] + held["grads"] + held["optimizer_state"] + held["buffers"]
            + held["ddp_buckets"],
            "live_between_steps_MiB": lt["at_step_start_MiB"][-1],
            "live_step_peak_over_MiB": lt["step_peak_MiB"][-1] - lt["at_step_start_MiB"][-1]}


def _value(rows, shape, provider, metric):
    for r in rows:
        if r["shape"] == shape and r["provider"] == provider and r["metric"] == metric:
            return float(r["median"])
    return None


def _steps(rows, shape):
    for r in rows:
        if r["shape"] == shape:
            return r["dims"].split("steps=")[1].split(",")[0]
    return "?"


def summary(doc):
    """The markdown tables of a results document (:func:`write_results`): the targets with
    both sides of each ratio, then what the live tensor memory and the resident memory are
    made of."""
    rows = doc["rows"]
    lines = ["| what (2 ranks: max over the ranks) | padded / DDP | packed / FSDP | ratio | target |",
             "| --- | ---: | ---: | ---: | --- |"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        a, b = _value(rows, shape, "padded", "tokens_per_s"), _value(rows, shape, "packed", "tokens_per_s")
        if a is not None and b is not None:
            lines.append(f"| tokens/s (`{shape}`) | {a:.0f} | {b:.0f} | {b / a:.2f}x | >= 1.3x |")
        for k in HEADLINE:
            a, b = _value(rows, shape, "ddp", k), _value(rows, shape, "fsdp", k)
            if a is not None and b is not None:
                target = "<= 0.6x (judged on this row)" if k == "peak_live_tensors_MiB" else ""
                lines.append(f"| {LABELS[k]} (`{shape}`) | {a:.0f} MiB | {b:.0f} MiB | {b / a:.2f}x | {target} |")
    parts = []
    if any(r["metric"] == "peak_live_tensors_MiB" for r in rows):
        parts.append("\nThe device-memory measure: the peak, over the training steps, of the bytes of the tensors "
                     "alive in torch's CPU allocator (what a GPU's `torch.cuda.max_memory_allocated` counts), "
                     "from a `--profile-memory` run per side.")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        if _value(rows, shape, "ddp", "params_MiB") is None or _value(rows, shape, "fsdp", "params_MiB") is None:
            continue
        if _value(rows, shape, "ddp", LIVE[0]) is not None and _value(rows, shape, "fsdp", LIVE[0]) is not None:
            parts += [f"\n`{shape}`, what the live tensor memory is made of (MiB, max over the ranks; a run of its "
                      f"own with `--profile-memory {_steps(rows, shape)}`):\n", "| part | DDP | FSDP |",
                      "| --- | ---: | ---: |"]
            for k in ("peak_live_tensors_MiB",) + LIVE:
                parts.append(f"| {LABELS[k]} | {_value(rows, shape, 'ddp', k):.0f} | "
                             f"{_value(rows, shape, 'fsdp', k):.0f} |")
        parts += [f"\n`{shape}`, what the resident memory is made of (MiB, from the trainer's RSS marks, max over "
                  f"the ranks):\n", "| part | DDP | FSDP |", "| --- | ---: | ---: |"]
        for k in COMPONENTS:
            a, b = _value(rows, shape, "ddp", k), _value(rows, shape, "fsdp", k)
            parts.append(f"| {LABELS[k]} | {a:.0f} | {b:.0f} |")
    dims = "; ".join(f"`{s}`: {d}" for s, d in dict.fromkeys((r["shape"], r["dims"]) for r in rows))
    return "\n".join(lines + parts) + (
        f"\n\n{doc['machine']}, torch {doc['torch']}, {doc['date']}, 1-minute load average {doc['load_before']:.1f} "
        f"before and {doc['load_after']:.1f} after (the cores are shared: compare the ratios of one run); {dims}; "
        f"memory runs with {' '.join(f'{k}={v}' for k, v in doc['malloc_env'].items())}. `{doc['command']}`, file "
        f"`{doc['file']}`.")


def write_results(rows, out_dir, slug, *, command, load_before):
    """``<out_dir>/rm-pack-<slug>.json`` (the rows with the run's date, machine, command and load
    average) and ``.md`` (:func:`summary`). Returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, RESULTS.format(slug=slug))
    rel = os.path.relpath(base + ".json", ROOT) if os.path.realpath(base).startswith(ROOT + os.sep) else base + ".json"
    first = rows[0] if rows else {}
    doc = {"date": first.get("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
           "machine": first.get("device_name", ""), "torch": first.get("torch", ""),
           "rmkernels": first.get("rmkernels", ""), "command": command, "file": rel.replace(os.sep, "/"),
           "load_before": load_before, "load_after": os.getloadavg()[0], "malloc_env": MALLOC_ENV, "rows": rows}
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    with open(base + ".md", "w") as f:
        f.write(f"# rm-pack: reward training, padded vs --packing, DDP vs --fsdp ({slug})\n\n{summary(doc)}\n")
    return [base + ".json", base + ".md"]


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
    ap.add_argument("--out", default=OUT, help=f"where the results go (default {OUT}; the committed ones: "
                    f"python benchmarks/run.py --ops rm-pack)")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    rows = run(shapes=args.shapes, quick=args.quick, tiny=args.tiny, only=args.providers)
    cmd = " ".join(["python benchmarks/bench_rm_pack.py"] + list(sys.argv[1:] if argv is None else argv))
    paths = write_results(rows, args.out, common.device_slug("cpu"), command=cmd, load_before=load)
    print(markdown(rows))
    common.log("written: " + ", ".join(paths))
    return rows


if __name__ == "__main__":
    main()
