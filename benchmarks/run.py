"""Run the benchmark suite over the named shapes and write the results.

    python benchmarks/run.py                       # every op, every named shape, e2e step
    python benchmarks/run.py --ops gae --shapes gae-s --quick
    python benchmarks/run.py --tiny --quick --ops bt --out /tmp/x   # smoke test
    python benchmarks/run.py --ops rm-pack         # opt-in: reward training runs (minutes)

Where it writes: a full run (every op and named shape, no ``--quick``/``--tiny``/``--shapes``/
``--providers``) writes the committed results, ``benchmarks/results/``, and says so; any
partial run writes to a scratch directory, ``runs/benchmarks/`` (ignored by git), unless
``--out`` names another one -- a partial run never rewrites the committed results.

Writes ``<out>/<device>.csv`` (tidy rows; groups this run measured replace the old ones,
whole), ``<out>/<device>.md`` (the table, with speedups vs ``hf`` and vs ``compile`` and the
targets of BENCHMARKS.md this run can judge) and ``<out>/<device>-<op>.png`` drawn from the
CSV. On a GPU the copy-bandwidth and empty-launch floors are measured first, in the same run.

``rm-pack`` (``bench_rm_pack.py``: whole ``rmkernels-train reward`` runs, padded vs
``--packing`` tokens/s and DDP vs ``--fsdp`` memory under torchrun; minutes) is opt-in: never
part of the default ops (a full run, ``--quick``, CI's smoke test), run only when ``--ops``
names it. Its results are its own files, ``<out>/rm-pack-<device>.json`` / ``.md``, written to
the committed ``benchmarks/results/`` when its own run is complete (no ``--quick``,
``--tiny``, ``--shapes``, ``--providers``), else to the scratch directory.
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

ALL_OPS = ("pooling", "bt", "pair", "gae", "grpo", "rpp", "remax", "e2e")
OPT_IN_OPS = ("rm-pack",)  # minutes each: only when --ops names them
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED_DIR = os.path.join(ROOT, "benchmarks", "results")
SCRATCH_DIR = os.path.join(ROOT, "runs", "benchmarks")


def partial_reasons(args, ops=ALL_OPS):
    """Why this run is partial for ``ops`` (empty for a full run of them, the only kind that
    may write their committed results)."""
    out = [f"--{name}" for name in ("quick", "tiny") if getattr(args, name)]
    if args.shapes:
        out.append("--shapes")
    if args.providers:
        out.append("--providers")
    if set(ops) - set(args.ops):
        out.append("--ops (not all)")
    return out


def resolve_out(args, ops=ALL_OPS):
    """(output directory, whether it is the committed results) of ``ops``' results. A partial
    run that names the committed directory is refused (SystemExit with the reason)."""
    partial = partial_reasons(args, ops)
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


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="*", default=list(ALL_OPS), choices=ALL_OPS + OPT_IN_OPS,
                    help=f"default: {' '.join(ALL_OPS)}; opt-in: {' '.join(OPT_IN_OPS)}")
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
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    main_ops = [op for op in args.ops if op in ALL_OPS]
    rm_pack = "rm-pack" in args.ops
    if rm_pack:
        rm_out, rm_committed = resolve_out(args, OPT_IN_OPS)
    out_dir, committed = resolve_out(args) if main_ops else (None, False)
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
    elif main_ops:
        common.log(f"  writes to {out_dir} (not the committed results)")
    cmd = " ".join(["python benchmarks/run.py"] + list(sys.argv[1:] if argv is None else argv))
    if rm_pack:
        from benchmarks import bench_rm_pack

        common.log(f"  rm-pack writes to {rm_out} ({'the committed results' if rm_committed else 'scratch'})")
        load = os.getloadavg()[0]
        rm_rows = bench_rm_pack.run(device=device, quick=args.quick, tiny=args.tiny, only=args.providers,
                                    shapes=[s for s in args.shapes or () if s in bench_rm_pack.CONFIGS] or None)
        paths = bench_rm_pack.write_results(rm_rows, rm_out, slug, command=cmd, load_before=load)
        if rm_committed:
            common.log("  docs/reward-training.md's table is generated from it: run python scripts/readme_figures.py")
        common.log("  rm-pack: " + ", ".join(paths))
        print(bench_rm_pack.markdown(rm_rows))
        if not main_ops:
            return 0
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for op in main_ops:
        if op == "pooling":
            from benchmarks import bench_pooling as mod
        elif op in ("bt", "pair"):
            from benchmarks import bench_bt_loss as mod
        elif op == "gae":
            from benchmarks import bench_gae as mod
        elif op == "grpo":
            from benchmarks import bench_group_adv as mod
        elif op in ("rpp", "remax"):
            from benchmarks import bench_reinforce as mod
        else:
            from benchmarks import bench_e2e_reward as mod
        rows += mod.run(op, device=device, shapes=args.shapes, quick=args.quick, tiny=args.tiny,
                        only=args.providers)
    for r in rows:
        r["run_id"], r["command"] = run_id, cmd
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, f"{slug}.csv")
    report.write_csv(rows, csv_path, merge=not args.no_merge)
    allrows = report.read_csv(csv_path)  # the table and the plots are drawn from the CSV as written
    md = report.markdown(allrows, title=f"rmkernels benchmarks: {slug}")
    threads, clock = torch.get_num_threads(), timing.clock(device)[1]
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
