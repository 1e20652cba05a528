"""Pieces shared by the training loops: errors, seeding, atomic saves, metrics, plots, DDP."""
import contextlib
import hashlib
import io
import json
import math
import os
import random
import sys

import torch

FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the largest finite float32 (options, data)


class TrainingError(Exception):
    """A problem the user can fix (bad data, bad option, NaN loss): the CLI prints the
    message on one line and exits with status 1, without a traceback."""


# ---------------------------------------------------------------------------------------
# Seeding and RNG state
# ---------------------------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------
_streams = {}  # absolute path of a data path that is not a regular file -> its bytes, read once


def env_world_size():
    """The number of processes torchrun started (its ``WORLD_SIZE``; 1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def open_data_text(path):
    """``path`` opened for reading as UTF-8 text. A path that is not a regular file (a pipe, a
    FIFO, ``/dev/stdin``) is read once and its bytes kept for the process, so reading it again
    gives the same text and :func:`data_bytes_sha256` hashes what was read (a second read of
    the pipe would be empty: --resume's data check recorded the SHA-256 of nothing); under
    torchrun (``WORLD_SIZE`` > 1) it is refused, a :class:`TrainingError`."""
    if os.path.isfile(path):
        return open(path, encoding="utf-8")
    if env_world_size() > 1 and not os.path.isdir(path) and (
            os.path.exists(path) or path.startswith(("/dev/fd/", "/proc/self/fd/", "/dev/stdin"))):
        # each rank would read its own part of one pipe (or none: torchrun's workers do not
        # inherit a <(...) descriptor), and train on different data
        raise TrainingError(f"{path} is not a regular file (a pipe, /dev/stdin or <(...)): under torchrun every "
                            f"rank reads the data itself, and a pipe can be read only once; write it to a file and "
                            f"pass that")
    key = os.path.abspath(path)
    if key not in _streams:
        with open(path, "rb") as f:
            _streams[key] = f.read()
    return io.TextIOWrapper(io.BytesIO(_streams[key]), encoding="utf-8")


def forget_streams():
    """Drop what :func:`open_data_text` kept (each run reads its pipes anew)."""
    _streams.clear()


def data_bytes_sha256(path):
    """The SHA-256 (hex) of a data path that is not a regular file, as :func:`open_data_text`
    read it (read now if it was not yet)."""
    open_data_text(path).close()
    return hashlib.sha256(_streams[os.path.abspath(path)]).hexdigest()


# ---------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------
def atomic_write_text(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # no half-written temporary file left behind
            os.remove(tmp)
        raise


def cannot_write(path, e):
    """The :class:`TrainingError` (one line) of a write of ``path`` that failed with the
    OSError ``e``."""
    return TrainingError(f"cannot write {path} ({e.strerror or e})")


# ---------------------------------------------------------------------------------------
# Metrics and plots
# ---------------------------------------------------------------------------------------
class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``. When resuming, lines from
    steps after the checkpoint (written by the run that is being resumed) are dropped first,
    so the file describes one consistent history; ``records`` holds the lines kept (a line
    cut short by a killed process, or one :func:`read_metrics` skips with ``required``, is
    dropped too). A failed write (disk full, the directory
    gone) is one line naming the file (:class:`TrainingError`)."""

    def __init__(self, path, resume_step=None, required=None):
        self.path = path
        self.records = []
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if resume_step is None:
                open(path, "w").close()
            elif os.path.exists(path):
                self.records = [r for r in read_metrics(path, required) if r["step"] <= resume_step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
            open(path, "a").close()  # a file the run cannot append to stops it now, not after a step
        except OSError as e:
            raise TrainingError(f"cannot write {path} ({e.strerror or e}): make it writable or choose another "
                                f"--output-dir") from None

    def write(self, record):
        from rmkernels_train.trainer import fault_point

        try:
            fault_point("metrics-write")  # the tests' hook (a disk full); unset: nothing
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise cannot_write(self.path, e) from None


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_metrics(path, required=None):
    """The records of a metrics file, one JSON object a line. A line is skipped when it is not
    one (the last line of a killed run, cut short), and when it is one of the wrong shape:
    its ``step`` is not an integer >= 0, its ``split`` (if any) is not a string, or, with
    ``required`` (``{split: (key, ...)}``), a key its split needs is missing or not a number.
    So every record returned has an integer ``step`` and what its reader asked for."""
    out = []
    required = required or {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if not isinstance(rec, dict):
                continue
            step, split = rec.get("step"), rec.get("split")
            if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
                continue
            if split is not None and not isinstance(split, str):
                continue
            if not all(_is_number(rec.get(k)) for k in required.get(split, ())):
                continue
            out.append(rec)
    return out


def plot_curves(metrics_path, png_path, keys=("loss", "accuracy", "margin"), title=None):
    """One panel per key: the train curve (records with ``split == "train"``) and the eval
    points (``split == "eval"``) against the optimizer step. Written atomically; a failed write
    (disk full) is one line naming it (:class:`TrainingError`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for ax, key in zip(axes, keys):
        for split, style in (("train", "-"), ("eval", "o-")):
            pts = [(r["step"], r[key]) for r in records if r.get("split") == split and _is_number(r.get(key))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    from rmkernels_train.trainer import fault_point

    try:  # a failed write (disk full) is one line naming the plot
        fault_point("plot-write")  # the tests' hook (a disk full); unset: nothing
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, png_path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise cannot_write(png_path, e) from None
    finally:
        plt.close(fig)


def one_line(e, limit=300):
    """The message of exception ``e`` on one line for a one-line error: its lines joined
    (transformers often puts the substance after the first line), at most ``limit``
    characters; the exception's type name when it has no message."""
    s = " ".join(str(e).split())
    return s[:limit] if s else type(e).__name__


def is_finite(x):
    return math.isfinite(float(x))


# ---------------------------------------------------------------------------------------
# Distributed (torchrun) setup
# ---------------------------------------------------------------------------------------
class Dist:
    """The process's place in a torchrun job (a single process when not under torchrun)."""

    def __init__(self, rank=0, world_size=1, local_rank=0, device=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = torch.device("cpu") if device is None else device

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, values):
        """Mean over ranks of a list of floats (each rank's value weighted equally)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            torch.distributed.all_reduce(t)
            t /= self.world_size
        return t.tolist()

    def sum(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag):
        """Whether ``flag`` holds on any rank (one all-reduce of one number; one process: ``flag``):
        the collective stop checks, so that every rank takes the same branch and none is left
        waiting in a collective the others never reach."""
        return bool(self.sum([1.0 if flag else 0.0])[0])

    def gather_object(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def setup_distributed(device=None):
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1): NCCL on
    GPUs, gloo on CPU. Returns a :class:`Dist`. ``device``: "cpu", "cuda" or None (a GPU
    when there is one)."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else str(device).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but torch sees no CUDA GPU")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, dev)


def teardown_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_process(rc):
    """End the process with status ``rc`` (the command-line entry points). A torchrun worker
    (``WORLD_SIZE`` > 1: setup_distributed joins a process group) flushes stdout and stderr and
    ends with ``os._exit``: no interpreter
    finalization. There, gloo's C++ worker threads, still referenced by the wrapped model's
    process group after ``destroy_process_group``, could abort a finished run with SIGABRT
    ("terminate called without an active exception"; three times in 2-rank CI runs, each after
    ``final.json`` was written) and torchrun then reports the run as failed. Every file of a run
    is closed by then (written in ``with`` blocks, checkpoints renamed into place). Any other
    process exits normally (``sys.exit``)."""
    if env_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def broadcast_parameters(module, dist):
    """Under torchrun: every rank's parameters and buffers become rank 0's (collective; what DDP
    does when it wraps a model). One process: nothing."""
    if dist is None or not dist.enabled:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(t.data, src=0)


def param_digest(model):
    """sha256 of every parameter's name and bytes (as float32): equal digests mean equal
    weights. Used to check that DDP ranks end with identical parameters."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
