"""Run the benchmark suite over the named shapes and write the results.

    python benchmarks/run.py                       # every op, every named shape, e2e step
    python benchmarks/run.py --ops gae --shapes gae-s --quick
    python benchmarks/run.py --tiny --quick --ops bt --out /tmp/x   # smoke test

Where it writes: a full run (every op and named shape, no ``--quick``/``--tiny``/``--shapes``/
``--providers``) writes the committed results, ``benchmarks/results/``, and says so; any
partial run writes to a scratch directory, ``runs/benchmarks/`` (ignored by git), unless
``--out`` names another one -- a partial run never rewrites the committed results.

Writes ``<out>/<device>.csv`` (tidy rows; groups this run measured replace the old ones,
whole), ``<out>/<device>.md`` (the table, with speedups vs ``hf`` and vs ``compile`` and the
targets of BENCHMARKS.md this run can judge) and ``<out>/<device>-<op>.png`` drawn from the
CSV. On a GPU the copy-bandwidth and empty-launch floors are measured first, in the same run.
"""
try:
    from benchmarks import _path  # noqa: F401
except ImportError:
    import _path  # noqa: F401

import argparse
import os
import sys
import time

import torch

from benchmarks import common, report, timing

ALL_OPS = ("pooling", "bt", "pair", "gae", "grpo", "e2e")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED_DIR = os.path.join(ROOT, "benchmarks", "results")
SCRATCH_DIR = os.path.join(ROOT, "runs", "benchmarks")


def partial_reasons(args):
    """Why this run is partial (empty for a full run, the only kind that may write the
    committed results)."""
    out = [f"--{name}" for name in ("quick", "tiny") if getattr(args, name)]
    if args.shapes:
        out.append("--shapes")
    if args.providers:
        out.append("--providers")
    if set(args.ops) != set(ALL_OPS):
        out.append("--ops (not all)")
    return out


def resolve_out(args):
    """(output directory, whether it is the committed results). A partial run that names the
    committed directory is refused (SystemExit with the reason)."""
    partial = partial_reasons(args)
    out = args.out or (SCRATCH_DIR if partial else COMMITTED_DIR)
    real, base = os.path.realpath(out), os.path.realpath(COMMITTED_DIR)
    committed = real == base or real.startswith(base + os.sep)  # benchmarks/results and its sub-directories
    if committed and partial:
        raise SystemExit(f"benchmarks/run.py: a partial run ({', '.join(partial)}) never writes the committed results "
                         f"in {COMMITTED_DIR}; leave out --out (scratch: {SCRATCH_DIR}) or name another directory")
    return out, committed


def floor_rows(device):
    env = common.env_fields(device)
    base = dict(op="floor", shape="-", dims="", dtype="", provider="hw", mode="-", bytes=0, note="", **env)
    (gb, gb20, gb80), ms = timing.copy_bandwidth_gbps()
    (l50, l20, l80) = timing.empty_launch_ms()
    return [dict(base, metric="copy_GBps", median=gb, p20=gb80, p80=gb20, unit="GB/s",
                 note="1 GiB device-to-device copy, bytes read + written"),
            dict(base, metric="launch_ms", median=l50, p20=l20, p80=l80, unit="ms", note="empty kernel launch")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="*", default=list(ALL_OPS), choices=ALL_OPS)
    ap.add_argument("--shapes", nargs="*", help="named shapes (default: all of each op's)")
    ap.add_argument("--providers", nargs="*", help="only these providers (hf torch compile rmk-cpu ...)")
    ap.add_argument("--quick", action="store_true", help="fewer samples, shorter time budget")
    ap.add_argument("--tiny", action="store_true", help="the *-t smoke-test shapes (and a tiny e2e config)")
    ap.add_argument("--device", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (recorded in every row)")
    ap.add_argument("--out", default=None, help="output directory (default: benchmarks/results for a full run, "
                    "runs/benchmarks for a partial one)")
    ap.add_argument("--no-merge", action="store_true", help="overwrite the CSV instead of merging groups")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    out_dir, committed = resolve_out(args)
    args.out = out_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    timing.enable_cpu_peak_memory()
    slug = common.device_slug(device)
    common.log(f"rmkernels benchmarks on {common.device_name(device)} [{slug}], torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, ops {args.ops}")
    t0 = time.time()
    rows = []
    if device == "cuda":
        rows += floor_rows(device)
        common.log(f"  floors: copy {rows[0]['median']:.0f} GB/s, empty launch {rows[1]['median'] * 1e3:.1f} us")
    if committed:
        common.log(f"  a full run: it writes the committed results in {out_dir}")
    else:
        common.log(f"  writes to {out_dir} (not the committed results)")
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for op in args.ops:
        if op == "pooling":
            from benchmarks import bench_pooling as mod
        elif op in ("bt", "pair"):
            from benchmarks import bench_bt_loss as mod
        elif op == "gae":
            from benchmarks import bench_gae as mod
        elif op == "grpo":
            from benchmarks import bench_group_adv as mod
        else:
            from benchmarks import bench_e2e_reward as mod
        rows += mod.run(op, device=device, shapes=args.shapes, quick=args.quick, tiny=args.tiny,
                        only=args.providers)
    for r in rows:
        r["run_id"] = run_id
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, f"{slug}.csv")
    allrows = report.write_csv(rows, csv_path, merge=not args.no_merge)
    md = report.markdown(allrows, title=f"rmkernels benchmarks: {slug}")
    threads, clock = torch.get_num_threads(), timing.clock(device)[1]
    cmd = " ".join(["python benchmarks/run.py"] + list(sys.argv[1:] if argv is None else argv))
    md += (f"\n\nWritten by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
           f"{'a full run, the committed results' if committed else 'a partial run, scratch results'}; "
           f"method: {threads} torch thread(s), clock {clock} (each row records its own threads and clock).")
    with open(os.path.join(args.out, f"{slug}.md"), "w") as f:
        f.write(md + "\n")
    written = [csv_path, os.path.join(args.out, f"{slug}.md")]
    if not args.no_plots:
        written += report.plots(allrows, args.out, slug)
    if committed:
        common.log("  the README's table is generated from the committed CSV: run python scripts/readme_figures.py")
    common.log(f"done in {time.time() - t0:.0f} s: " + ", ".join(written))
    print(report.markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
