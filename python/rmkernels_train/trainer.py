"""The skeleton every ``rmkernels-train`` command is built on, each piece implemented once:

- the options every trainer shares (:func:`add_run_args`: ``--output-dir``, ``--resume``,
  ``--seed``, ``--save-every``, ``--save-total-limit``, ``--stop-after``, ``--device``,
  ``--threads``, ``--backend``, ``--no-progress``, ``--no-plot``), their checks and a help
  formatter that prints a default only where it says something;
- start-up checks made before any data is read or model built: the output directory is a
  usable place (:func:`check_output_dir`) and the optional dependencies of the ``[train]``
  extra are installed (:func:`check_optional_deps`); the thread count (:func:`setup_threads`);
  then the output directory is locked for the run (:class:`OutputDirLock`: a second run there
  stops with one line);
- :func:`cli_main`: option parsing, the distributed set-up and tear-down, and user errors
  (:class:`TrainingError`) printed on one line with exit status 1, never a traceback;
- checkpoints: ``<output-dir>/checkpoint-<step>/`` written atomically (a temporary
  ``.tmp-checkpoint-*`` directory renamed into place) with the permissions the umask gives,
  the last ``--save-total-limit`` kept (:func:`save_checkpoint`); leftovers of a killed
  write removed at start, a checkpoint a killed rewrite had moved aside put back
  (:func:`remove_stale_checkpoint_dirs`); ``--resume`` takes the newest
  checkpoint whose every file loads (:func:`find_resume_checkpoint`), saying which ones it
  skipped and why (weights that do not fit the model, :func:`check_state_dict` /
  :func:`check_safetensors_fit`, or hold NaN / inf, :func:`check_finite_tensors`, are
  damage; a file that exists and cannot be read, e.g. for lack of permission, is not damage:
  the run stops, naming it, :func:`unreadable`); the options that must not change checked once
  (:func:`check_resume_args`, paths compared as real paths: a changed option stops the run, it
  never makes a checkpoint look damaged), and the data files' and an RL run's reward model's
  contents (:func:`data_digests`, :func:`check_resume_data`: a file edited or replaced since the
  checkpoint's run stops it too; under torchrun the ranks' digests are compared);
  rotation never deletes a checkpoint newer than the one written unless ``--resume`` found it
  damaged; a failed write (disk full) is one line naming the path, under torchrun on every
  rank whichever rank failed (:func:`save_checkpoint_on_main`, used by every trainer's
  checkpoint there); no checkpoint holds non-finite parameters (:func:`check_finite_before_saving`);
- rank 0's other files (``metrics.jsonl``, ``final.json``, ``curves.png``, PPO's ``policy/``
  and its default reward model): under torchrun a failed write stops every rank with one line
  too (:class:`MainWrites`; a line of ``metrics.jsonl`` is checked with the step's own
  all-reduce, no collective of its own), through the same exchange as the checkpoints
  (:func:`share_outcome`);
- option checks shared by the trainers: :func:`check_finite` (nan / inf refused, ranges),
  :func:`check_int`, ``--seed`` in [0, 2^32-1], ``--threads`` at most 4 per core;
- nothing under an output directory can run code when it is read: JSON, safetensors, and
  :func:`load_torch_state` (``torch.load(..., weights_only=True)``) only, and ``--fsdp``'s
  sharded state through :func:`rmkernels_train.fsdp.load_sharded` (which replaces the plain
  unpickling of torch's own checkpoint reader);
- the progress bar (:func:`progress_bar`), the log (:class:`Log`) and the words of a run
  that ``--stop-after`` ended early (:func:`stopped_early`).

A fault-injection hook for tests, :func:`fault_point`: with ``RMKERNELS_TRAIN_FAULT=NAME:N``
in the environment the process kills itself (SIGKILL) the N-th time it reaches the point
``NAME`` (``checkpoint-write``: inside a checkpoint write, after the model files;
``dir-rename``: a checkpoint (or other atomic directory) is complete and not yet renamed
into place; ``step``: after an optimizer step, before anything about it is saved;
``shard-write``: a rank is about to write its shards of an ``--fsdp`` checkpoint;
``metrics-write``: a line of ``metrics.jsonl`` is about to be appended; ``final-write``:
``final.json`` is about to be written; ``plot-write``: ``curves.png`` is about to be
written). With
``NAME:N:ERRNO`` (an :mod:`errno` name, e.g. ``ENOSPC``) it raises that ``OSError`` there
instead (a disk full); with ``RMKERNELS_TRAIN_FAULT_RANK=R`` only the torchrun rank R (its
``RANK``) counts and fails. Unset, it does nothing.
"""
import argparse
import contextlib
import errno
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import stat
import sys
import tempfile

import torch

from rmkernels_train.utils import TrainingError, forget_streams, one_line, setup_distributed, teardown_distributed

CHECKPOINT_RE = re.compile(r"^checkpoint-(0|[1-9][0-9]*)$")
STALE_PREFIXES = (".tmp-checkpoint-", ".old-checkpoint-", ".tmp-policy-", ".old-policy-", ".tmp-warm_start-",
                  ".old-warm_start-")
# Files a trainer writes at the top of its output directory: each must be a file if it exists.
OUTPUT_FILES = ("metrics.jsonl", "final.json", "curves.png")
TRAIN_EXTRA = "pip install 'rmkernels[train]'"


# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------
class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help only when X says something: not for
    flags (``store_true`` / ``store_false``: the help says what they do), not for ``None``,
    and not when the help text already speaks of the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or isinstance(action.default, bool) or action.default == argparse.SUPPRESS or
                action.nargs == 0 or "default" in text.lower() or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def add_run_args(parser, *, output_dir, save_every, save_total_limit=2):
    """The options every trainer shares, in an argument group "run"."""
    g = parser.add_argument_group("run")
    g.add_argument("--output-dir", default=output_dir, metavar="DIR",
                   help="where metrics.jsonl, curves.png, final.json and checkpoint-<step>/ go")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint-<step>/ in --output-dir (damaged ones are "
                        "skipped, with the reason)")
    g.add_argument("--seed", type=int, default=0, help="seed of everything random (the same seed gives the same run)")
    g.add_argument("--save-every", type=int, default=save_every, metavar="N",
                   help="write a checkpoint every N steps (and at the end)")
    g.add_argument("--save-total-limit", type=int, default=save_total_limit, metavar="K",
                   help="keep the newest K checkpoints (older ones are deleted)")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N steps in this invocation, with a checkpoint (for time-limited jobs; "
                        "continue with --resume)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a CUDA GPU when there is one")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads per process (at most 4 per core); 0 = torch's default (one per core). "
                        "Default: 1 with the "
                        "built-in tiny models (too small to gain from threads, and they lose much to OpenMP "
                        "contention on a shared CPU), 0 with a model of your own")
    g.add_argument("--backend", default=None,
                   help="rmkernels backend (reference, cpu, cuda, triton); default: the fastest available")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="do not show a progress bar")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="do not write curves.png at the end")
    return g


# --seed: what every random generator of the trainers takes (numpy's legacy seed is < 2**32).
MAX_SEED = 2**32 - 1


def max_threads():
    """The most ``--threads`` accepted: 4 per core (more only thrashes, and OpenMP crashes
    when asked for a very large team)."""
    return 4 * (os.cpu_count() or 1)


def check_finite(name, v, *, low=None, low_open=False, high=None, high_open=False):
    """A float option's value must be finite (nan/inf are refused) and within the bounds:
    ``low`` (``low_open``: excluded), ``high`` (``high_open``: excluded). None passes (unset)."""
    if v is None:
        return
    flag = "--" + name.replace("_", "-")
    lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
    hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
    want = " and ".join(x for x in (lo, hi) if x)
    bad = (not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low))
           or (high is not None and (v >= high if high_open else v > high)))
    if bad:
        raise TrainingError(f"{flag} must be a finite number{' ' + want if want else ''}, got {v}")


def check_int(name, v, *, low=None, high=None):
    """An integer option's value must be within ``[low, high]``. None passes (unset)."""
    if v is None:
        return
    flag = "--" + name.replace("_", "-")
    if low is not None and v < low:
        raise TrainingError(f"{flag} must be >= {low}, got {v}")
    if high is not None and v > high:
        raise TrainingError(f"{flag} must be <= {high}, got {v}")


def check_run_args(args):
    """Checks of the shared options (no side effects)."""
    if not args.output_dir or not args.output_dir.strip():
        raise TrainingError("--output-dir is empty: give a directory")
    if not 0 <= args.seed <= MAX_SEED:
        raise TrainingError(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    if args.threads is not None and args.threads > max_threads():
        raise TrainingError(f"--threads must be <= {max_threads()} (4 per core of this machine), got {args.threads}")
    for name in ("save_every", "save_total_limit", "stop_after"):
        check_int(name, getattr(args, name), low=1)
    if args.threads is not None and args.threads < 0:
        raise TrainingError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    if args.backend is not None:
        import rmkernels as rmk

        if args.backend not in tuple(rmk.BACKENDS) + ("auto",):
            raise TrainingError(f"--backend must be one of {', '.join(rmk.BACKENDS)} or auto, got {args.backend!r}")
        if args.backend != "auto":  # can it run here, on the tensors of this run's device?
            device = getattr(args, "device", "auto")
            device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
            why = rmk.backend_report(device).get(args.backend)
            if why is not None:
                raise TrainingError(f"--backend {args.backend} cannot run here ({device} tensors): {why}. Available: "
                                    f"{', '.join(rmk.available_backends(device))}")


def threads_for(args, built_in):
    """What ``--threads`` means: N > 0 threads, 0 = torch's default; unset, 1 for the
    built-in tiny models (``built_in``) and 0 otherwise."""
    return args.threads if args.threads is not None else (1 if built_in else 0)


def setup_threads(args, built_in):
    """Set torch's intra-op threads as ``--threads`` says (:func:`threads_for`). Returns the
    number (0 = torch's default)."""
    threads = threads_for(args, built_in)
    if threads > 0:
        torch.set_num_threads(threads)
    return threads


def check_optional_deps(args, extra_modules=()):
    """The ``[train]`` extra's modules this run will need, checked before any work:
    transformers, safetensors and tokenizers always, tqdm for the progress bar, matplotlib for
    curves.png."""
    need = [("transformers", None), ("safetensors", None), ("tokenizers", None), *extra_modules]
    if getattr(args, "progress", False):
        need.append(("tqdm", "--no-progress"))
    if getattr(args, "plot", False):
        need.append(("matplotlib", "--no-plot"))
    for module, flag in need:
        without = f", or run with {flag}" if flag else ""
        if importlib.util.find_spec(module) is None:
            raise TrainingError(f"the Python package {module!r} is not installed: {TRAIN_EXTRA} "
                                f"(the extra with the trainers' dependencies){without}")
        if flag is not None:  # used only at the end (curves.png) or on the way: a broken one stops the run now
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001 (ImportError, or whatever its own imports raise)
                raise TrainingError(f"the Python package {module!r} is installed but cannot be imported "
                                    f"({type(e).__name__}: {one_line(e)}): reinstall it{without}") from None


def check_output_dir(path, files=OUTPUT_FILES):
    """Refuse an output directory that cannot work, before anything is loaded or built: a
    file, a path under a file, a symbolic link to nothing (dangling, or a loop), a place that
    cannot be written, or one where an output file name (``metrics.jsonl``, ...) is taken by
    something that is not a file. Creates nothing."""
    p = os.path.abspath(path)
    if os.path.lexists(p) and not os.path.exists(p):  # makedirs would fail with "File exists"
        raise TrainingError(f"--output-dir {path}: a symbolic link to nothing (its target does not exist, or the "
                            f"links loop); remove it or choose another --output-dir")
    if os.path.exists(p):
        if not os.path.isdir(p):
            raise TrainingError(f"--output-dir {path}: exists and is not a directory")
        for name in files:
            f = os.path.join(p, name)
            if os.path.lexists(f) and not os.path.isfile(f):
                raise TrainingError(f"--output-dir {path}: {name} is there and is not a regular file "
                                    f"(the run writes {name}); remove it or choose another --output-dir")
        probe_in = p
    else:
        probe_in = os.path.dirname(p)
        while not os.path.exists(probe_in):
            probe_in = os.path.dirname(probe_in)
        if not os.path.isdir(probe_in):
            raise TrainingError(f"--output-dir {path}: cannot be created, {probe_in} is a file")
    try:  # a real write: os.access() says yes to root on read-only mounts and /proc
        probe = tempfile.mkdtemp(prefix=".rmk-write-probe-", dir=probe_in)
        os.rmdir(probe)
    except OSError as e:
        raise TrainingError(f"--output-dir {path}: cannot write in {probe_in} ({e.strerror})") from None


LOCK_FILE = ".rmkernels-train.lock"


class OutputDirLock:
    """An exclusive lock on an output directory for the length of a run: ``fcntl.flock`` on
    ``<dir>/.rmkernels-train.lock`` (:data:`LOCK_FILE`), taken before the run writes anything
    (:func:`lock_output_dir`). A second run in the same directory stops with one line instead
    of replacing the first one's checkpoints and metrics. The kernel drops the lock when its
    process dies, so the file a killed run leaves never blocks the next run. :meth:`release`
    (at the end of the run) removes the file while still holding the lock, and a run that
    locked a file since removed locks the new one instead; it also removes the directory when
    the lock created it and the run wrote nothing there (a run refused at start leaves no
    directory behind)."""

    def __init__(self, path):
        import fcntl

        self.path = path
        self.file = os.path.join(path, LOCK_FILE)
        self.created = not os.path.exists(path)
        make_output_dir(path)  # the one place the directory is created, with its message
        try:
            while True:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise TrainingError(f"--output-dir {path}: another run is using it (it holds {self.file}); "
                                        f"wait for that run to end, or choose another --output-dir") from None
                except BaseException:
                    os.close(fd)
                    raise
                try:  # the file this run locked is still the one at the path (not removed by a release)
                    same = os.path.samestat(os.fstat(fd), os.stat(self.file))
                except FileNotFoundError:
                    same = False
                if same:
                    self.fd = fd
                    return
                os.close(fd)
        except OSError as e:
            raise TrainingError(f"--output-dir {path}: cannot lock {self.file} ({e.strerror or e})") from None

    def release(self):
        if getattr(self, "fd", None) is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.file)
        os.close(self.fd)  # closing the last descriptor of the file releases the lock
        self.fd = None
        if self.created:
            with contextlib.suppress(OSError):  # only an empty directory: nothing else was written
                os.rmdir(self.path)


def lock_output_dir(path):
    """:class:`OutputDirLock` of ``path`` for the process that writes the run's files (under
    torchrun the rank 0 of ``RANK``, before the process group exists); None for the others."""
    if os.environ.get("RANK", "0") != "0":
        return None
    return OutputDirLock(path)


def make_output_dir(path):
    """Create the output directory (and its parents) if it is not there: the one place every
    subcommand does it, early (rank 0). A failure (a link that went dangling since
    :func:`check_output_dir`, a disk error) is one line naming --output-dir."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        why = "a symbolic link to nothing" if os.path.islink(path) else (e.strerror or str(e))
        raise TrainingError(f"--output-dir {path}: cannot create it ({why})") from None


# ---------------------------------------------------------------------------------------
# The command around a trainer
# ---------------------------------------------------------------------------------------
class Log:
    """Messages of rank 0 on stderr, prefixed with the command's name. While a progress bar
    is shown, messages go through it so that they do not break its line."""

    def __init__(self, prog, dist):
        self.prog, self.dist, self.bar = prog, dist, None

    def __call__(self, msg):
        if self.dist is not None and not self.dist.is_main:
            return
        line = f"[{self.prog}] {msg}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


def stopped_early(steps_this_run):
    """How a trainer's last line says that ``--stop-after`` ended this invocation early."""
    return f"stopped after {steps_this_run} steps (--stop-after; --resume goes on)"


def past_the_end(step, total, flags):
    """How a trainer's last line says that ``--resume`` found a checkpoint past the steps this
    run asks for (``flags``: the options that set them): nothing was trained."""
    return f"nothing to train: the checkpoint is at step {step}, past the {total} steps this run asks for ({flags})"


def run_status(step, total, steps_this_run, flags):
    """The head of a trainer's last line: "" when the run reached ``total``, the
    :func:`past_the_end` / :func:`stopped_early` phrase (and "; ") otherwise."""
    if step > total:
        return past_the_end(step, total, flags) + "; "
    return "" if step >= total else stopped_early(steps_this_run) + "; "


def progress_bar(args, dist, *, total, initial, desc):
    """A tqdm bar on rank 0 (None with --no-progress and on other ranks)."""
    if not (dist.is_main and args.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)


def cli_main(prog, parser, check_args, run, argv, *, built_in):
    """Parse ``argv``, check the options, the output directory and the optional dependencies
    (before any data is read or model built), set the threads and the distributed group, and
    call ``run(args, dist, log)``. A :class:`TrainingError` becomes one line on stderr and exit
    status 1. ``built_in(args)`` says whether the run uses the built-in tiny models."""
    args = parser.parse_args(argv)
    dist = lock = None
    forget_streams()  # a data pipe read by an earlier run of this process is not this run's data
    try:
        check_run_args(args)
        check_args(args)
        check_output_dir(args.output_dir)
        check_optional_deps(args)
        lock = lock_output_dir(args.output_dir)  # before anything is written there; held until the end
        setup_threads(args, built_in(args))
        dist = setup_distributed(args.device)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" / "Writing model shards" bars inside ours
        rc = run(args, dist, Log(prog, dist))
        # Every rank that finished reaches this point before any tears its process group down:
        # a rank that destroys gloo's group while its peer still uses it can abort at exit
        # ("terminate called without an active exception", seen once in the 2-rank PPO test; it
        # recurred at interpreter finalization, which the entry points now skip for torchrun
        # workers: utils.exit_process).
        dist.barrier()
        return rc if isinstance(rc, int) else 0
    except TrainingError as e:
        rank = f" (rank {dist.rank})" if dist is not None and dist.enabled else ""
        print(f"{prog}: error{rank}: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:
        lost = lost_peer(e) if dist is not None and dist.enabled else None
        if lost is None:
            raise
        print(f"{prog}: error (rank {dist.rank}): a collective failed: another rank of the torchrun job ended or "
              f"lost its connection ({lost}); the checkpoints written are intact: find why that rank "
              f"stopped (its own log), then resume with --resume", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        teardown_distributed()
        if lock is not None:
            lock.release()


# What a collective raises on a rank whose peer process died (gloo's words; NCCL's watchdog
# and torch's own store raise torch.distributed.DistError subclasses).
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")


def lost_peer(e):
    """The short reason if ``e`` is a collective's error because another rank is gone (its
    process killed or crashed), else None: a surviving rank says so in one line instead of a
    traceback."""
    text = str(e)
    dist_error = getattr(torch.distributed, "DistError", None)
    if not ((dist_error is not None and isinstance(e, dist_error)) or (
            isinstance(e, RuntimeError) and "gloo" in text and any(w in text for w in PEER_LOST))):
        return None
    first = text.split("] ", 1)[-1] if text.startswith("[") else text  # gloo's "[.../pair.cc:537] "
    return first.split(". ", 1)[0].strip()[:200] or type(e).__name__


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------
def checkpoint_path(output_dir, step):
    return os.path.join(output_dir, f"checkpoint-{step}")


def list_checkpoints(output_dir):
    """``([(step, path)] oldest first, [(name, why refused)])`` of the ``checkpoint-*``
    directories in ``output_dir``. The step must be a non-negative integer written plainly
    (``checkpoint-abc``, ``checkpoint--3``, ``checkpoint-007`` are refused)."""
    if not os.path.isdir(output_dir):
        return [], []
    good, refused = [], []
    for name in sorted(os.listdir(output_dir)):
        if not name.startswith("checkpoint-"):
            continue
        path = os.path.join(output_dir, name)
        m = CHECKPOINT_RE.match(name)
        if not m:
            refused.append((name, "the step after 'checkpoint-' is not a non-negative integer"))
        elif not os.path.isdir(path):
            refused.append((name, "not a directory"))
        else:
            good.append((int(m.group(1)), path))
    return sorted(good), refused


def remove_stale_checkpoint_dirs(output_dir, log):
    """Remove what a killed write of a checkpoint (or of PPO's final ``policy/``) leaves
    behind (``.tmp-checkpoint-*``, ``.old-checkpoint-*``, ...): with large models they would
    fill the disk. A directory that :func:`atomic_dir` had moved aside to replace it
    (``.old-<name>-*/d``) and whose replacement never landed (a kill between the two renames)
    is put back as ``<name>`` first: replacing a checkpoint never loses it."""
    _DAMAGED.pop(os.path.abspath(output_dir), None)  # a new run: nothing found damaged yet
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        if name.startswith(".old-") and "-" in name[len(".old-"):]:
            target = os.path.join(output_dir, name[len(".old-"):].rsplit("-", 1)[0])
            moved = os.path.join(output_dir, name, "d")
            if os.path.isdir(moved) and not os.path.lexists(target):
                try:
                    os.replace(moved, target)
                    log(f"restored {os.path.basename(target)} (an interrupted rewrite had moved it aside)")
                except OSError as e:
                    raise write_failed(target, e) or TrainingError(
                        f"cannot restore {target} from {moved}: {e.strerror or one_line(e)}") from None
    for name in sorted(os.listdir(output_dir)):
        if name.startswith(STALE_PREFIXES):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
            log(f"removed {name} (left by an interrupted checkpoint write)")


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path):
    """Give a tree the permissions the umask gives new files (``mkdtemp`` makes 0700 and
    some writers 0600): directories ``0777 & ~umask``, files ``0666 & ~umask``."""
    mask = _umask()
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            fp = os.path.join(root, f)
            if not os.path.islink(fp):
                exec_bits = os.stat(fp).st_mode & stat.S_IXUSR
                os.chmod(fp, (0o777 if exec_bits else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(final_path):
    """Yield a temporary directory ``.tmp-<name>-*`` next to ``final_path``; on success it
    gets the umask's permissions and is renamed to ``final_path`` (an existing one is
    replaced), so a reader never sees a half-written directory. On error it is removed."""
    parent = os.path.dirname(os.path.abspath(final_path))
    name = os.path.basename(final_path)
    try:  # a disk full (mkdir needs a block) or a directory gone or replaced by a file: one line too
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    except OSError as e:
        raise write_failed(final_path, e) from None
    try:
        yield tmp
        apply_umask(tmp)
        fault_point("dir-rename")
        old = None
        if os.path.exists(final_path):  # os.replace cannot replace a non-empty directory
            old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
            os.replace(final_path, os.path.join(old, "d"))
        os.replace(tmp, final_path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = write_failed(final_path, e)
        if failed is not None:
            raise failed from None
        raise


def write_failed(final_path, e):
    """The :class:`TrainingError` (one line naming ``final_path``) of a checkpoint write that
    failed with ``e``, if ``e`` is a write error (:func:`_is_write_error`: disk full, ...);
    else None. Also for a rank that writes its part of rank 0's checkpoint (``--fsdp``'s
    shards) outside :func:`atomic_dir`."""
    if not (isinstance(e, Exception) and _is_write_error(e, final_path)):
        return None
    why = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
    return TrainingError(f"cannot write {final_path} ({why}); the checkpoints already written are intact (free "
                         f"some space and resume with --resume)")


# The checkpoints that --resume found damaged and skipped, per output directory (absolute
# paths; set by find_resume_checkpoint, cleared at the start of every run by
# remove_stale_checkpoint_dirs). Rotation (save_checkpoint) deletes a checkpoint newer than
# the one being written only when it is in this set: never an intact one.
_DAMAGED = {}


# What the writers' own errors say when a write fails (torch.save's stream writer: "unexpected
# pos N vs M" or "basic_ios::clear: iostream error" on a full disk; safetensors' SafetensorError:
# "I/O error: No space left on device").
_WRITE_ERROR_TEXTS = ("write", "writing", "No space", "file", "unexpected pos", "iostream error", "I/O error",
                      "quota")


def _is_write_error(e, path=None):
    """An error of writing a file (disk full, quota, I/O): OSError; torch.save's RuntimeError or
    safetensors' SafetensorError saying so (``_WRITE_ERROR_TEXTS``); or, with ``path``, any
    error while the filesystem of ``path`` has under 1 MiB left (a full disk that the writer
    reported in its own words)."""
    if isinstance(e, OSError):
        return True
    if (isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError") and any(
            w in str(e) for w in _WRITE_ERROR_TEXTS):
        return True
    return path is not None and _nearly_full(path)


def _nearly_full(path):
    """Whether the filesystem holding ``path`` (or its nearest existing parent) has under
    1 MiB free for this user."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 2**20


def save_checkpoint(output_dir, step, write, keep):
    """Write ``checkpoint-<step>/`` atomically (:func:`atomic_dir`): ``write(tmp_dir)`` fills
    the temporary directory; then all but the newest ``keep`` intact checkpoints up to
    ``step`` are deleted (with those up to ``step`` that ``--resume`` found damaged), and the
    damaged ones past ``step``. A checkpoint past ``step`` that was not found damaged is
    never deleted. A reader never sees a half-written checkpoint. A failed write (disk full)
    is a :class:`TrainingError` naming the path; the older checkpoints stay. Returns the
    path."""
    final = checkpoint_path(output_dir, step)
    with atomic_dir(final) as tmp:
        write(tmp)
        write_file_list(tmp)
    good, _ = list_checkpoints(output_dir)
    damaged = _DAMAGED.get(os.path.abspath(output_dir), set())
    damaged.discard(os.path.abspath(final))  # rewritten: intact now
    # Damaged checkpoints past this step belong to a history this run left (a resume from an
    # older checkpoint when the newer ones were damaged): never keep them instead of this one.
    older = [path for s, path in good if s <= step and os.path.abspath(path) not in damaged]
    doomed = older[:-keep] + [path for s, path in good if os.path.abspath(path) in damaged]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        damaged.discard(os.path.abspath(path))
    return final


# Every file of a checkpoint with its size, written last into it (save_checkpoint) and checked
# after a resume's loader read it (check_file_list; the loader first: it names a changed option
# before anything is called damaged, and a damaged file in its own words): a file deleted, cut
# short or grown afterwards that the loader takes as optional (a tokenizer's chat_template.jinja,
# whose absence transformers reads as "no template") makes the checkpoint damaged, not silently
# different. Not listed: trainer_state.json (its reader checks every field). --fsdp's shards
# (fsdp.DCP_DIR) are listed: every rank has written its files when rank 0 lists them (the
# collective save returns after them), so a shard file deleted or cut short is found here.
FILE_LIST = "checkpoint_files.json"
UNLISTED = (FILE_LIST, "trainer_state.json")


def _checkpoint_files(path):
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel not in UNLISTED:
                files[rel] = os.path.getsize(full)
    return files


def write_file_list(tmp):
    """:data:`FILE_LIST` of the checkpoint being written in ``tmp``."""
    with open(os.path.join(tmp, FILE_LIST), "w") as f:
        json.dump(_checkpoint_files(tmp), f, indent=1, sort_keys=True)


def check_file_list(path):
    """Every file :data:`FILE_LIST` names is in the checkpoint ``path`` with its size, else
    :class:`CheckpointError` naming it (a checkpoint written before the list existed has none:
    not checked)."""
    list_path = os.path.join(path, FILE_LIST)
    if not os.path.exists(list_path):
        return
    listed = read_json(list_path)
    if not isinstance(listed, dict):
        raise CheckpointError(f"{FILE_LIST} is not a file list")
    for rel, size in sorted(listed.items()):
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{rel} is missing (it was written with the checkpoint)")
        if os.path.getsize(full) != size:
            raise CheckpointError(f"{rel} has {os.path.getsize(full)} bytes, written with {size}")


def save_checkpoint_on_main(dist, output_dir, step, write, keep, every_rank=None):
    """A torchrun job's checkpoint (collective: every rank calls it, in the same order on
    success and failure): rank 0 writes ``checkpoint-<step>`` (:func:`save_checkpoint` with
    ``write``); with ``every_rank``, each rank first calls ``every_rank(tmp)`` with rank 0's
    temporary directory (``--fsdp``'s shards; itself collective). Then every rank learns
    whether every rank succeeded, and on a failure of any rank every rank raises a
    :class:`TrainingError`: its own one line (:func:`write_failed`), or the failed rank's
    (``rank R: ...``). So a rank whose peer could not write (a disk full on rank 0 alone) stops
    with one line instead of waiting in a collective that rank 0 never reaches (gloo:
    "Connection closed by peer"; NCCL: a hang until the timeout). Returns the path."""
    final = checkpoint_path(output_dir, step)
    error = None
    announced = False

    def write_all(tmp):
        nonlocal announced
        if every_rank is not None:
            announced = True
            dist.broadcast_object(tmp)
            every_rank(tmp)
        write(tmp)

    if not dist.enabled:
        return save_checkpoint(output_dir, step, write_all, keep)
    if dist.is_main:
        try:
            save_checkpoint(output_dir, step, write_all, keep)
        except Exception as e:  # told to every rank, then raised
            error = e
        if every_rank is not None and not announced:  # failed before the directory existed
            dist.broadcast_object(None)
    elif every_rank is not None:
        tmp = dist.broadcast_object(None)
        if tmp is not None:
            try:
                every_rank(tmp)
            except Exception as e:  # told to every rank, then raised
                error = write_failed(final, e) or e
    share_outcome(dist, error)
    return final


def share_outcome(dist, error):
    """The exchange behind every write that one rank makes while the others have collectives
    ahead (collective under torchrun: every rank calls it at the same point, whatever happened):
    every rank passes its own outcome, ``error`` (an exception, or None), and learns every
    rank's. On a failure of any rank every rank raises: its own ``error``, or else a
    :class:`TrainingError` ``rank R: <line>`` with the first failed rank's line. So no rank goes
    on to a collective that a failed rank never reaches (gloo: "Connection closed by peer";
    NCCL: a hang until the timeout). One all-reduce of one number (how many ranks failed), and
    only when it is not 0 an all-gather of each rank's line (None or the line): the exchange of
    pickled objects costs host copies and two collectives, and the RL trainers make this one
    every step. A single process raises ``error`` if there is one."""
    if not dist.enabled:
        if error is not None:
            raise error
        return
    if not dist.any(error is not None):
        return
    lines = dist.gather_object(None if error is None else
                               str(error) if isinstance(error, TrainingError) else one_line(error))
    if error is not None:
        raise error
    failed = next(((r, line) for r, line in enumerate(lines) if line is not None), None)
    if failed is not None:
        raise TrainingError(f"rank {failed[0]}: {failed[1]}")


class MainWrites:
    """The files rank 0 alone writes besides checkpoints (``metrics.jsonl``, ``final.json``,
    ``curves.png``, PPO's ``policy/``, ...), so that a failed write (a disk full, the output
    directory gone) stops every rank with one line, through :func:`share_outcome`.

    ``writes(fn, *args)`` calls ``fn(*args)`` on rank 0 (the other ranks: nothing; None). In a
    single process a failure is raised at once, as a plain call would. Under torchrun it is
    kept instead, later calls are skipped, and rank 0 goes on with the others to the next
    :meth:`check` (a collective), where every rank raises. A per-step write (a line of
    ``metrics.jsonl``) costs no collective of its own: the trainer adds :attr:`failed` to the
    all-reduce it makes every step anyway and passes the sum to :meth:`check`, which exchanges
    the lines only when it is not 0. Rank 0 keeps taking every collective the other ranks take
    until that check (it may compute a step that is never applied: the check comes before the
    optimizer step, and before every checkpoint). :meth:`now` is a write checked at once (the
    start's and the end's files)."""

    def __init__(self, dist):
        self.dist, self.error = dist, None

    def __call__(self, fn, *args):
        dist = self.dist
        if not dist.is_main:
            return None
        if not dist.enabled:
            return fn(*args)
        if self.error is None:
            try:
                return fn(*args)
            except Exception as e:  # kept for the next check (every rank raises there)
                self.error = e
        return None

    @property
    def failed(self):
        """1.0 when a write of this rank failed, else 0.0: a value to add to a sum all-reduced
        by every rank (:meth:`check`'s ``failed``)."""
        return 0.0 if self.error is None else 1.0

    def check(self, failed=None):
        """Collective under torchrun (every rank at the same point): raise on every rank if a
        write failed. ``failed``: the sum over the ranks of :attr:`failed`, all-reduced by the
        caller with its own values (the exchange is made only when it is not 0); None: exchange
        now (a small all-gather)."""
        if self.dist.enabled and (failed is None or failed):
            share_outcome(self.dist, self.error)

    def now(self, fn, *args):
        """``self(fn, *args)`` then :meth:`check`: rank 0's result, None on the other ranks."""
        result = self(fn, *args)
        self.check()
        return result


def write_final(output_dir, summary):
    """``<output_dir>/final.json``: the run's summary, written atomically; a failed write (disk
    full) is one line naming it (:class:`TrainingError`)."""
    from rmkernels_train.utils import atomic_write_text, cannot_write

    path = os.path.join(output_dir, "final.json")
    try:
        fault_point("final-write")  # the tests' hook (a disk full); unset: nothing
        atomic_write_text(path, json.dumps(summary, indent=1) + "\n")
    except OSError as e:
        raise cannot_write(path, e) from None


class CheckpointError(Exception):
    """A checkpoint file is missing or damaged (the message says which and how)."""


def unreadable(path, e):
    """A checkpoint file that exists and cannot be read for another reason than damage (no
    permission, an I/O error): a :class:`TrainingError` that stops the run. Skipping the
    checkpoint as damaged would resume from an older one and overwrite the newer, intact one."""
    return TrainingError(f"--resume: cannot read {path} ({e.strerror or type(e).__name__}); fix that and run "
                         f"again (the checkpoint is not skipped: it may be intact)")


def _check_readable(path, name):
    """:class:`CheckpointError` if ``path`` is missing, :func:`unreadable` if it cannot be opened."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise CheckpointError(f"{name} is missing") from None
    except IsADirectoryError:
        raise CheckpointError(f"{name} is a directory, not a file") from None
    except OSError as e:
        raise unreadable(path, e) from None


def read_json(path, what=None):
    """A JSON file's content, or :class:`CheckpointError` naming the file (a file that exists
    and cannot be read: :func:`unreadable`)."""
    name = what or os.path.basename(path)
    _check_readable(path, name)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{name} is missing") from None
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{name} is not readable JSON ({type(e).__name__}: {one_line(e)})") from None


def load_torch_state(path):
    """A ``torch.save``'d state (optimizer, scheduler, RNG) loaded with ``weights_only=True``:
    tensors and plain containers only, so a planted pickle cannot run code. A missing or
    damaged file raises :class:`CheckpointError`."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{name} is missing")
    _check_readable(path, name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (refused object), RuntimeError / EOFError (truncated), ...
        raise CheckpointError(f"{name} cannot be loaded safely ({type(e).__name__}: {one_line(e)})") from None


def load_safetensors(path, *, tensors=True, name=None):
    """A safetensors file's tensors (no code can run); ``tensors=False`` only checks that
    the file is complete (its header and size agree) without reading the tensors.
    :class:`CheckpointError` (naming the file ``name``, default its base name) if missing or
    damaged."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{name} is missing")
    _check_readable(path, name)
    try:
        if tensors:
            return load_file(path)
        with safe_open(path, framework="pt") as f:
            f.keys()
        return None
    except Exception as e:  # SafetensorError, OSError
        raise CheckpointError(f"{name} is damaged ({type(e).__name__}: {one_line(e)})") from None


def read_trainer_state(path, int_keys=("step",)):
    """``trainer_state.json`` of the checkpoint ``path``, checked: a JSON object whose
    ``step`` is the directory's, whose ``int_keys`` are integers >= 0 and whose ``args``
    (the options of the run that wrote it) is an object."""
    step = int(os.path.basename(path).rsplit("-", 1)[1])
    state = read_json(os.path.join(path, "trainer_state.json"))
    if not isinstance(state, dict):
        raise CheckpointError("trainer_state.json is not a JSON object")
    for key in ("step", *int_keys):
        v = state.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError(f"trainer_state.json: {key!r} is {v!r}, not an integer >= 0")
    if state["step"] != step:
        raise CheckpointError(f"trainer_state.json says step {state['step']}, the directory name {step}")
    if not isinstance(state.get("args"), dict):
        raise CheckpointError("trainer_state.json has no 'args' object")
    return state


def _check_fit(module, shapes, name):
    """``shapes`` (tensor name -> shape, or None for what is not a tensor) must cover every
    parameter of ``module`` (a tied weight, saved once, counts once) with its shape, and name
    nothing the module does not have."""
    allowed = module.state_dict()
    required = dict(module.named_parameters())
    missing = sorted(set(required) - set(shapes))
    unexpected = sorted(set(shapes) - set(allowed))
    if missing or unexpected:
        raise CheckpointError(f"{name} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in shapes.items():
        if shape is None or tuple(shape) != tuple(allowed[k].shape):
            raise CheckpointError(f"{name} does not fit the model ({k} has the wrong shape)")


def check_state_dict(module, tensors, name, *, finite=True):
    """``tensors`` (a loaded state dict) must hold every parameter of ``module`` (a tied
    weight, saved once, counts once) with its shape, and nothing the module does not have;
    with ``finite`` (the default) every floating-point tensor must be finite (a checkpoint of
    NaN / infinite weights is damaged: :func:`check_finite_tensors`)."""
    _check_fit(module, {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else None) for k, v in tensors.items()},
               name)
    if finite:
        check_finite_tensors(tensors, name)


def check_finite_tensors(tensors, name):
    """:class:`CheckpointError` if a floating-point tensor of ``tensors`` (a state dict) holds
    a NaN or an infinite value: such a checkpoint is damaged (resuming from it would train
    from NaN)."""
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) \
                and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{name} holds non-finite values ({k} has NaN or inf)")


def check_finite_parameters(module, name):
    """:class:`CheckpointError` naming ``name`` (the file ``module``'s parameters were loaded
    from) if one of them holds NaN or inf (:func:`nonfinite_parameter`)."""
    bad = nonfinite_parameter(("", module))
    if bad is not None:
        raise CheckpointError(f"{name} holds non-finite values ({bad} has NaN or inf)")


def check_safetensors_fit(module, path, name=None):
    """The safetensors file ``path`` must hold every parameter of ``module`` with its shape
    and nothing else (:func:`check_state_dict`'s rule), read from its header only (no tensor
    is loaded). A file that does not fit is damaged (:class:`CheckpointError`): a loader such
    as ``from_pretrained`` would initialise the missing weights randomly and go on."""
    from safetensors import safe_open

    name = name or os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError
        raise CheckpointError(f"{name} is damaged ({type(e).__name__}: {one_line(e)})") from None
    _check_fit(module, shapes, name)


def check_optimizer_state(make_optimizer, state):
    """Load a saved optimizer state into a probe optimizer (``make_optimizer()``, over the
    model's parameters: their values are not touched) and check every state tensor's shape
    and that its values are finite (a NaN moment would make every step after the resume
    diverge); a state that does not fit raises :class:`CheckpointError`."""
    probe = make_optimizer()
    try:
        probe.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"optimizer.pt does not fit the model ({one_line(e)})") from None
    for group in probe.param_groups:
        for p in group["params"]:
            for k, v in probe.state.get(p, {}).items():
                if k != "step" and (not isinstance(v, torch.Tensor) or v.shape != p.shape):
                    raise CheckpointError("optimizer.pt does not fit the model (a state tensor has the wrong shape)")
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise CheckpointError(f"optimizer.pt holds non-finite values (its {k!r} state)")


def find_resume_checkpoint(output_dir, load, log, dist=None, damaged=None):
    """The newest checkpoint of ``output_dir`` that ``load(path)`` reads completely:
    returns ``(step, path, loaded)`` with what ``load`` returned. ``load`` must read every
    file a resume uses (so that a damaged one is found before anything is changed) and raise
    :class:`CheckpointError` for a damaged one; each skipped checkpoint is logged with the
    reason. ``damaged``: {path: reason} of checkpoints already found damaged after they were
    chosen (an --fsdp checkpoint's shards are read only into the sharded model), skipped the
    same way. No intact checkpoint: :class:`TrainingError` listing the reasons. With ``dist``
    (a torchrun job) every rank looks, and all must find the same step (else every rank stops
    with the reason, e.g. an output directory that is not shared by every node; the ranks'
    errors prefixed "rank R: ", or once when every rank has the same one)."""
    try:
        found, error = _find_resume_checkpoint(output_dir, load, log, damaged or {}), None
    except TrainingError as e:
        found, error = None, e
    if dist is None or not dist.enabled:
        if error is not None:
            raise error
        return found
    views = dist.gather_object((found[0] if found else None, None if error is None else str(error)))
    errors = [(r, e) for r, (_, e) in enumerate(views) if e is not None]
    if errors:
        if len(errors) == len(views) and len({e for _, e in errors}) == 1:  # every rank's the same: said once
            raise TrainingError(errors[0][1])
        raise TrainingError("; ".join(f"rank {r}: {e}" for r, e in errors))
    if len({step for step, _ in views}) > 1:
        raise TrainingError(f"--resume: the ranks found different newest intact checkpoints (steps "
                            f"{[step for step, _ in views]}); every rank must see the same --output-dir")
    return found


def _find_resume_checkpoint(output_dir, load, log, known_damaged):
    good, refused = list_checkpoints(output_dir)
    skipped = [f"{name}: {why}" for name, why in refused]
    for name_why in skipped:
        log(f"--resume: skipping {name_why}")
    damaged = _DAMAGED.setdefault(os.path.abspath(output_dir), set())
    damaged.clear()
    # A checkpoint that cannot be used for another reason than damage (an option changed,
    # an unreadable file) stops the run with a TrainingError from load(): skipping it would
    # resume from an older one, and rotation would then delete the newer, intact one.
    for step, path in reversed(good):
        try:
            if path in known_damaged:
                raise CheckpointError(known_damaged[path])
            loaded = load(path)
            check_file_list(path)
        except CheckpointError as e:
            msg = f"{os.path.basename(path)}: {e}"
            log(f"--resume: skipping {msg}")
            skipped.append(msg)
            damaged.add(os.path.abspath(path))
            continue
        return step, path, loaded
    if not skipped:
        raise TrainingError(f"--resume: no checkpoint-<step> directory in {output_dir}")
    raise TrainingError(f"--resume: no intact checkpoint in {output_dir} ({'; '.join(skipped)})")


# Options that name a file or directory: on --resume they are compared as resolved real paths
# (./data/x.jsonl, data/x.jsonl and /abs/data/x.jsonl are the same option).
PATH_OPTIONS = ("data", "eval_data", "model", "prompts", "policy", "reward_model")


def _same_option(key, a, b):
    if key in PATH_OPTIONS and isinstance(a, str) and isinstance(b, str):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def _option_name(key):
    """How a resume message names a fixed option: its flag, or for ``world_size`` (no flag) what it is."""
    if key == "world_size":
        return "the number of processes (torchrun's ranks)"
    return "--" + key.replace("_", "-")


def check_resume_args(saved, args, fixed, world_size):
    """The options in ``fixed`` (which decide what each step sees, or the model and its
    optimizer) must be those of the checkpoint's run (``saved``: its ``args`` dict, with
    ``world_size``); paths (:data:`PATH_OPTIONS`) compare as real paths. A changed one is a
    :class:`TrainingError` naming it (never a reason to skip the checkpoint)."""
    now = {**vars(args), "world_size": world_size}
    changed = [f"{_option_name(k)} was {saved.get(k)!r} in the checkpoint's run and is {now.get(k)!r} now"
               for k in fixed if not _same_option(k, saved.get(k), now.get(k))]
    if changed:
        raise TrainingError("--resume: " + "; ".join(changed) + " (these options must stay the same on --resume: "
                            "they decide what each step sees, or the model and its optimizer; use another "
                            "--output-dir to change them)")


# Options that name a data file: a checkpoint records the SHA-256 of each given one's contents
# (trainer_state.json's "data_sha256"); --resume refuses a file that changed since.
DATA_OPTIONS = ("data", "eval_data", "prompts")
_digests = {}  # (real path, size, mtime_ns) -> SHA-256: a file is read once per run


def file_sha256(path):
    """The SHA-256 (hex) of the file ``path``'s contents; an unreadable file is a
    :class:`TrainingError` naming it. A path that is not a regular file (a pipe) is hashed as
    the run read it (:func:`~rmkernels_train.utils.data_bytes_sha256`)."""
    try:
        if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
            from rmkernels_train.utils import data_bytes_sha256

            return data_bytes_sha256(path)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key not in _digests:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            _digests[key] = h.hexdigest()
    except OSError as e:
        raise TrainingError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    return _digests[key]


# The files of a model directory that make the model as transformers loads it: its config, its
# weights (one file or the shards an index names, HF's names) and its tokenizer (PPO encodes the
# prompts with the reward model's); not a checkpoint's optimizer, nor other files beside them.
MODEL_FILE = re.compile(r"config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
                        r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json"
                        r"|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|chat_template\.jinja")


def model_dir_sha256(path):
    """One SHA-256 over the config, weight and tokenizer files of the model directory ``path``
    (:data:`MODEL_FILE`: names and contents, in name order). It reads the weights once more
    than loading does: SHA-256 ran at 1.4 GB/s on one core of the 2-core CI machine
    (2026-12-02), about 10 s for a 7B model in bf16."""
    h = hashlib.sha256()
    try:
        names = sorted(n for n in os.listdir(path) if MODEL_FILE.fullmatch(n))
    except OSError as e:
        raise TrainingError(f"cannot read model directory {path}: {e.strerror or type(e).__name__}") from None
    for name in names:
        h.update(f"{name}\0{file_sha256(os.path.join(path, name))}\0".encode())
    return h.hexdigest()


def data_digests(args, reward_dir=None, existing_only=False, dist=None):
    """``{option: SHA-256}`` of the data files ``args`` names (:data:`DATA_OPTIONS`, those
    given), and with ``reward_dir`` (an RL run's reward model, the directory --reward-model
    resolved to) ``"reward_model"``: :func:`model_dir_sha256`; for a checkpoint's
    ``trainer_state.json``. ``existing_only``: data files that are not there are left out.
    With ``dist`` (a torchrun job; collective) every rank's digests are compared: ranks that
    read different contents under one path (a node with another copy of the file) stop every
    rank with one line naming the option, before a step is taken on data that differs."""
    out, error = {}, None
    try:
        out = {k: file_sha256(getattr(args, k)) for k in DATA_OPTIONS
               if getattr(args, k, None) and not (existing_only and not os.path.exists(getattr(args, k)))}
        if reward_dir is not None:
            out["reward_model"] = model_dir_sha256(reward_dir)
    except TrainingError as e:
        if dist is None or not dist.enabled:
            raise
        error = str(e)
    if dist is not None and dist.enabled:
        views = dist.gather_object((out, error))  # every rank, also one that failed: none left waiting
        errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(views) if e is not None]
        if errors:
            raise TrainingError(error if error is not None else "; ".join(errors))
        differ = sorted({k for d, _ in views for k in d if len({v.get(k) for v, _ in views}) > 1})
        if differ:
            names = ", ".join("the reward model" if k == "reward_model" else "--" + k.replace("_", "-")
                              for k in differ)
            raise TrainingError(f"the ranks read different contents for {names} (SHA-256 per rank: "
                                f"{[d.get(differ[0], '-')[:12] for d, _ in views]}); every rank of a torchrun "
                                f"job must read the same files")
    return out


def check_resume_data(state, args, reward_dir=None, now=None):
    """The data files of this run hold what they held in the checkpoint's run (its
    ``data_sha256``; a checkpoint written before it was recorded is not checked): the same path
    (:func:`check_resume_args`) with other contents would change what each step sees, silently.
    So must an RL run's reward model (``reward_dir``: retrained in place, or a reward run's
    directory whose ``final.json`` now names a later checkpoint). ``now``: this run's
    :func:`data_digests`, when it has them (an RL run, before it looks for a checkpoint: each
    checkpoint tried is then checked without hashing the reward model again). A changed one is
    a :class:`TrainingError` naming it."""
    saved = state.get("data_sha256")
    if not isinstance(saved, dict):
        return
    # a data file that is gone is left to the loader, whose message names it ("cannot read data file ...")
    if now is None:
        now = data_digests(args, reward_dir, existing_only=True)
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in DATA_OPTIONS
               if k in saved and k in now and saved[k] != now[k]]
    if changed:
        raise TrainingError(f"--resume: the contents of {' and '.join(changed)} changed since the checkpoint's run "
                            f"(SHA-256 recorded in its trainer_state.json): the resumed steps would see other data "
                            f"(restore the file, or use another --output-dir)")
    if "reward_model" in saved and "reward_model" in now and saved["reward_model"] != now["reward_model"]:
        raise TrainingError(f"--resume: the reward model in {reward_dir} is not the one the checkpoint's run "
                            f"used (its config, weights or tokenizer changed since; SHA-256 recorded in its "
                            f"trainer_state.json): the resumed steps would be scored by another model (restore it, "
                            f"or use another --output-dir)")


def nonfinite_parameter(*modules):
    """The name of the first parameter of ``modules`` (``(name, module)`` pairs) with a NaN
    or infinite value (a sharded DTensor: this rank's shard), or None. One host
    synchronisation for all the parameters (one per parameter only when one is not finite)."""
    named = [(f"{name}.{pname}" if name else pname, p.to_local() if hasattr(p, "to_local") else p)
             for name, module in modules for pname, p in module.named_parameters()]
    if not named:
        return None
    flags = [torch.isfinite(t.detach()).all() for _, t in named]
    if bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
        return None
    return next(n for n, t in named if not bool(torch.isfinite(t.detach()).all()))


def nonfinite_parameter_on_any_rank(dist, *modules):
    """:func:`nonfinite_parameter` of this rank, or under torchrun the first rank's that found
    one (the same answer on every rank): one all-reduce of one number, and the names exchanged
    only when some rank found one."""
    bad = nonfinite_parameter(*modules)
    if dist is not None and dist.enabled and dist.any(bad is not None):
        bad = next((b for b in dist.gather_object(bad) if b is not None), None)
    return bad


def check_finite_before_saving(dist, step, last_ckpt, *modules):
    """Called before writing a checkpoint (on every rank): parameters that are not finite
    stop the run instead of being saved, naming the last checkpoint written (every written
    checkpoint passed this check)."""
    bad = nonfinite_parameter_on_any_rank(dist, *modules)
    if bad is not None:
        where = (f"the last checkpoint (finite parameters) is {last_ckpt} (resume with --resume)" if last_ckpt
                 else "no checkpoint had been written")
        raise TrainingError(f"parameters are not finite after step {step} ({bad}); not saved; {where}. Try a "
                            f"lower --lr (or check --max-grad-norm, --weight-decay)")


def diverged(what, last_ckpt):
    """The one line that stops an RL run whose policy diverged (``what`` happened), naming the
    last checkpoint written (every written checkpoint has finite parameters)."""
    where = (f"the last good checkpoint is {last_ckpt} (resume with --resume)" if last_ckpt
             else "no checkpoint had been written yet")
    return TrainingError(f"{what}: training diverged; {where}. Try a lower --lr.")


def check_ranks_hold_the_same(dist, *modules):
    """At the end of an RL run (collective under torchrun): every rank's parameters of ``modules``
    are the same (``utils.param_digest``), else every rank stops naming the digests."""
    from rmkernels_train.utils import param_digest

    digests = dist.gather_object(tuple(param_digest(m) for m in modules))
    if len(set(digests)) != 1:
        raise TrainingError(f"DDP ranks ended with different parameters: {digests}")


def check_finite_after_update(dist, step, last_ckpt, *modules):
    """Called after the optimizer steps of RL step ``step`` (on every rank): a policy (or value
    model) whose parameters went NaN or infinite stops the run now (:func:`diverged`), not with
    a traceback from sampling the next rollouts."""
    bad = nonfinite_parameter_on_any_rank(dist, *modules)
    if bad is not None:
        raise diverged(f"the parameters are not finite after the update of step {step} ({bad})", last_ckpt)


def nonfinite_logits(steps, last_ckpt):
    """:func:`diverged` for ``ppo_core.NonFiniteLogits``: finite parameters whose logits overflow."""
    return diverged(f"after {steps} step(s) the policy's next-token logits are not finite (NaN or +inf)", last_ckpt)


def fault_point(name):
    """The test hook described in the module docstring."""
    spec = os.environ.get("RMKERNELS_TRAIN_FAULT")
    if not spec or not spec.startswith(name + ":"):
        return
    rank = os.environ.get("RMKERNELS_TRAIN_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    count, *error = spec[len(name) + 1:].split(":")
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(count):
        if error:
            code = getattr(errno, error[0])
            raise OSError(code, os.strerror(code))
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS = {}
