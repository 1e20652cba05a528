"""``--fsdp``: the reward model sharded with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``),
built and loaded shard by shard: no rank ever holds the whole model.

- :func:`build_on_meta`: the model's constructor runs with every parameter on the ``meta``
  device (no memory; buffers such as RoPE's ``inv_freq`` are made for real, they are small).
  With ``record_init=True`` every in-place operation the constructor applies to a parameter
  (torch's default init at construction, then HF's ``post_init``) is recorded in order, as an
  :class:`InitPlan`; the torch RNG is left untouched.
- :func:`shard`: ``fully_shard`` on every decoder layer (the classes the HF model lists in
  ``_no_split_modules``) and on the root, over a 1-D mesh of all ranks (NCCL on GPUs, gloo on
  CPU); a meta model is then materialised on the device (``to_empty``: each rank allocates
  its shards only) and its buffers get back their constructed values. Parameters stay float32
  (the optimizer's master copy); ``--bf16`` is a ``MixedPrecisionPolicy`` (bf16 compute,
  float32 gradient reduction) instead of autocast. The root's forward is the patched one
  (``rmk.patch_hf_reward_model``, or the packed forward of :mod:`rmkernels_train.packing`),
  so the fused ``rmk.pairwise_reward_loss`` runs inside it while the root's parameters
  (embeddings, final norm, ``score``) are gathered.
- :func:`init_shards`: replays an :class:`InitPlan` on the CPU one tensor at a time, in the
  constructor's order (so the torch RNG produces exactly the values, and ends in exactly the
  state, of the eager constructor: the same seed gives the same model as DDP or one
  process), and copies this rank's rows of each parameter into its shard.
- :func:`checkpoint_index` / :func:`load_shards`: an HF safetensors checkpoint read tensor by
  tensor, each rank reading only its rows (``safe_open(...).get_slice``);
  :func:`record_missing_init` records what ``from_pretrained`` would initialise (a causal-LM
  checkpoint's new ``score`` head), for :func:`init_shards`.
- :func:`clip_grad_norm`: the total gradient norm over the sharded (DTensor) gradients, the
  same on every rank, and the clipping.
- :func:`save_sharded` / :func:`load_sharded`: model and optimizer state as a
  ``torch.distributed.checkpoint`` directory (every rank writes and reads its own shards).
  torch reads its ``.metadata`` with a plain ``pickle.load`` and its non-tensor items with
  ``torch.load(weights_only=False)``; :func:`load_sharded` replaces both
  (:func:`read_sharded_metadata`: only the classes such a file holds; ``weights_only=True``),
  so a planted checkpoint cannot run code.
- :func:`full_state_dict`: the whole model gathered on rank 0 (CPU), for the HF checkpoint
  that ``from_pretrained`` loads (:func:`save_hf`): the one time the whole model is in one
  process's (host) memory.

Peak host memory of a rank while the model is built: its shards plus the largest single
parameter (one full tensor at a time).
"""
import contextlib
import copy
import json
import os

import torch

from rmkernels_train.utils import TrainingError

DCP_DIR = "sharded"  # the torch.distributed.checkpoint directory inside checkpoint-<step>/


def check_torch():
    """--fsdp uses FSDP2 and DTensor as public APIs (``torch.distributed.fsdp.fully_shard``,
    ``torch.distributed.tensor``: torch >= 2.6; the package itself needs torch >= 2.4): a
    :class:`TrainingError` naming the torch installed, before anything is built."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor, Shard  # noqa: F401
    except ImportError as e:
        raise TrainingError(f"--fsdp needs torch >= 2.6 (FSDP2's fully_shard and DTensor as public APIs); "
                            f"torch {torch.__version__} is installed ({e})") from None


def decoder_layers(model):
    """The modules to shard one by one: those whose class is in the model's
    ``_no_split_modules`` (HF's list of blocks that must stay whole: the decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not layers:
        raise TrainingError(f"--fsdp: cannot find the decoder layers of {type(model).__name__} (its "
                            f"_no_split_modules {sorted(names)} name no submodule)")
    return layers


def mixed_precision(bf16):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


# ---------------------------------------------------------------------------------------
# Building the model without holding it: parameters on the meta device, their values
# replayed or read one tensor at a time
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def params_on_meta():
    """Inside, every parameter a module registers is moved to the ``meta`` device before it is
    registered (a constructor's ``torch.empty`` is never written, so it costs no resident
    memory); buffers stay where they are made. Unlike a ``torch.device("meta")`` context, HF's
    ``post_init`` still runs its weight initialisation (on the meta parameters), so that
    :class:`_InitRecorder` sees it."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:
            meta = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            param = meta
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _storage_key(t):
    return t.untyped_storage()._cdata


def _seeded(func):
    return torch.Tag.nondeterministic_seeded in func.tags


class _InitRecorder:
    """A dispatch mode that records, in order, every in-place op on a meta tensor (what a
    constructor does to its parameters), and refuses a random op on a real tensor (it would
    draw from the RNG now, out of the order the replay keeps)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                target = args[0] if args and isinstance(args[0], torch.Tensor) else None
                if target is not None and target.is_meta and func._schema.is_mutable:
                    ops.append((func, args, kwargs))
                elif _seeded(func):
                    raise TrainingError(f"--fsdp: the model's constructor draws random numbers for a tensor "
                                        f"that is not a parameter ({func}); building it shard by shard cannot "
                                        f"reproduce that")
                return func(*args, **kwargs)

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


class InitPlan:
    """The recorded initialisation of some parameters of a meta model (:func:`build_on_meta`,
    :func:`record_missing_init`): ``ops`` in the order they ran, ``names`` the parameter
    names of each meta storage and ``layout`` its parameter's size, strides and offset (taken
    before sharding, which keeps the names but replaces the tensors)."""

    def __init__(self, ops, model, only=None):
        self.ops = ops
        self.names, self.layout = {}, {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if only is None or name in only:
                self.names.setdefault(_storage_key(p), []).append(name)
                self.layout[_storage_key(p)] = (p.size(), p.stride(), p.storage_offset())
        self._keep = [p for _, p in model.named_parameters()]  # the meta storages stay alive (unique keys)

    def param_names(self):
        return sorted(n for names in self.names.values() for n in names)


_FULL_WRITES = {"normal_", "uniform_", "fill_", "zero_", "copy_", "random_", "bernoulli_", "exponential_",
                "geometric_", "cauchy_", "log_normal_"}


def _covers(t):
    """Whether the in-place target ``t`` is its whole storage (a full overwrite)."""
    return (t.storage_offset() == 0 and t.is_contiguous()
            and t.numel() * t.element_size() == t.untyped_storage().nbytes())


def _real_args(args, kwargs, what):
    def check(x):
        if isinstance(x, torch.Tensor) and x.is_meta:
            raise TrainingError(f"--fsdp: {what} reads another meta tensor; building the model shard by shard "
                                f"cannot replay it")
        return x

    return tuple(check(a) for a in args), {k: check(v) for k, v in kwargs.items()}


def replay(plan, sink):
    """Replay ``plan`` on the CPU and call ``sink(names, tensor)`` with each planned parameter's
    final value as soon as it is known (then it is freed): at most the parameters whose
    initialisation is in progress are alive, one or two tensors. Every random op runs, on a
    scratch tensor of the same shape and strides when its result is overwritten later, so the
    torch RNG draws exactly what the eager constructor drew."""
    ops = plan.ops
    last_full, last_op = {}, {}
    for i, (func, args, _) in enumerate(ops):
        key = _storage_key(args[0])
        if key in plan.names:
            last_op[key] = i
            if func.__name__.split(".")[0] in _FULL_WRITES and _covers(args[0]):
                last_full[key] = i
    never = [n for key, names in plan.names.items() if key not in last_full for n in names]
    if never:
        raise TrainingError(f"--fsdp: the constructor never initialises {never[:5]}; cannot build the model shard "
                            f"by shard")
    live = {}
    with torch.no_grad():
        for i, (func, args, kwargs) in enumerate(ops):
            target = args[0]
            key = _storage_key(target)
            if key in last_full and i >= last_full[key]:
                if i == last_full[key]:
                    live[key] = torch.empty(target.untyped_storage().nbytes() // target.element_size(),
                                            dtype=target.dtype)
                real = live[key].as_strided(target.size(), target.stride(), target.storage_offset())
                rest, kw = _real_args(args[1:], kwargs, f"{func} on {plan.names[key][0]}")
                func(real, *rest, **kw)
                if i == last_op[key]:
                    sink(plan.names[key], live.pop(key).as_strided(*plan.layout[key]))
            elif _seeded(func):  # overwritten later (or not a planned parameter): only the draws count
                scratch = torch.empty_strided(target.size(), target.stride(), dtype=target.dtype)
                rest, kw = _real_args(args[1:], kwargs, str(func))
                func(scratch, *rest, **kw)


def build_on_meta(build, *, record_init=False):
    """``build()`` under :func:`params_on_meta`. Returns ``(model, plan)``: ``plan`` is the
    :class:`InitPlan` of every parameter with ``record_init`` (else None). The torch RNG is
    not advanced (the plan draws when it is replayed)."""
    rng = torch.get_rng_state()
    recorder = _InitRecorder() if record_init else contextlib.nullcontext()
    with params_on_meta(), recorder:
        model = build()
    if not torch.equal(rng, torch.get_rng_state()):
        raise TrainingError("--fsdp: building the model on the meta device drew random numbers")
    return model, (InitPlan(recorder.ops, model) if record_init else None)


def record_missing_init(model, loaded):
    """The :class:`InitPlan` of what ``from_pretrained`` initialises after loading the
    parameters ``loaded`` of a meta ``model``: HF's ``initialize_weights`` with the loaded
    parameters marked as initialised (transformers' rule for missing keys)."""
    for m in model.modules():
        m.__dict__.pop("_is_hf_initialized", None)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in loaded:
        params[name]._is_hf_initialized = True
    recorder = _InitRecorder()
    rng = torch.get_rng_state()
    with recorder:
        model.initialize_weights()
    if not torch.equal(rng, torch.get_rng_state()):
        raise TrainingError("--fsdp: recording the new weights' initialisation drew random numbers")
    for name in loaded:
        del params[name]._is_hf_initialized
    return InitPlan(recorder.ops, model, only=set(params) - set(loaded))


def _rows(p):
    """``(start, stop)``: the rows of the full tensor that the FSDP2 parameter ``p`` (a DTensor
    sharded on dim 0, ``torch.chunk``'s split) holds on this rank."""
    from torch.distributed.tensor import Shard

    if tuple(p.placements) != (Shard(0),):
        raise TrainingError(f"--fsdp: a parameter is placed {p.placements}, expected Shard(0)")
    n, ranks = p.shape[0], p.device_mesh.size()
    chunk = -(-n // ranks) if n else 0
    start = min(n, p.device_mesh.get_local_rank() * chunk)
    stop = min(n, start + chunk)
    if stop - start != p.to_local().shape[0]:
        raise TrainingError(f"--fsdp: shard of {tuple(p.shape)} has {p.to_local().shape[0]} rows on this rank, "
                            f"expected {stop - start}")
    return start, stop


def _fill(p, get_rows, name):
    """Copy rows ``get_rows(start, stop)`` of the full tensor into ``p``'s local shard (or the
    whole tensor into a plain parameter or buffer)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        if isinstance(p, DTensor):
            local = p.to_local()
            start, stop = _rows(p)
            part = get_rows(start, stop)
        else:
            local, part = p, get_rows(0, p.shape[0] if p.dim() else None)
        if tuple(part.shape) != tuple(local.shape):
            raise TrainingError(f"--fsdp: {name}: got {tuple(part.shape)} for a shard of {tuple(local.shape)}")
        local.copy_(part)


def _tensors(model):
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def init_shards(model, plan):
    """Fill the shards of ``plan``'s parameters in the sharded, materialised ``model`` with the
    values the eager constructor gives them (:func:`replay`)."""
    tensors = _tensors(model)

    def sink(names, full):
        for name in names:
            _fill(tensors[name], lambda a, b: full if b is None else full[a:b], name)

    replay(plan, sink)


def checkpoint_index(path, model, *, what="--model"):
    """Where each of ``model``'s tensors is in the HF safetensors checkpoint ``path``
    (``model.safetensors`` or a sharded ``model.safetensors.index.json``): ``{name: (file,
    key)}``. A checkpoint key is matched as is, or with the model's base-model prefix added
    (a backbone-only checkpoint); other keys (a causal LM's ``lm_head``) are not used, as
    ``from_pretrained`` does. Parameters the checkpoint lacks must be in the head (they are
    initialised, :func:`record_missing_init`); anything else is an error."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        raise TrainingError(f"{what} {path}: --fsdp reads safetensors checkpoints (model.safetensors or "
                            f"model.safetensors.index.json) and finds neither")
    names = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    found = {}
    for fname in files:
        with safe_open(os.path.join(path, fname), framework="pt") as f:
            for key in f.keys():
                for name in (key, f"{prefix}.{key}" if prefix else None):
                    if name in names and name not in found:
                        found[name] = (os.path.join(path, fname), key)
                        break
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in found]
    backbone = [n for n in missing if not prefix or n.startswith(prefix + ".")]
    if backbone:
        raise TrainingError(f"{what} {path}: the checkpoint lacks {len(backbone)} backbone weights ({backbone[:3]}) "
                            f"under the names the model uses; --fsdp loads tensors by name without transformers' "
                            f"key conversions (load it once without --fsdp and save it with save_pretrained)")
    return found


def load_shards(model, index):
    """Copy each rank's rows of the checkpoint tensors named in ``index``
    (:func:`checkpoint_index`) into the sharded, materialised ``model``, one tensor at a time
    and as float32 (the master weights); buffers the checkpoint has are copied whole."""
    from safetensors import safe_open

    tensors = _tensors(model)
    by_file = {}
    for name, (fname, key) in index.items():
        by_file.setdefault(fname, []).append((name, key))
    for fname, items in sorted(by_file.items()):
        with safe_open(fname, framework="pt") as f:
            for name, key in items:
                t = tensors[name]
                sl = f.get_slice(key)
                if tuple(sl.get_shape()) != tuple(t.shape):
                    raise TrainingError(f"{fname}: {key} has shape {tuple(sl.get_shape())}, the model's {name} "
                                        f"{tuple(t.shape)}")

                def rows(a, b, sl=sl, key=key, dtype=t.dtype):
                    return (sl[a:b] if b is not None else f.get_tensor(key)).to(dtype)

                _fill(t, rows, name)


def shard(model, dist, *, bf16=False):
    """Shard ``model`` in place over all ranks. Returns it. A model built by
    :func:`build_on_meta` is materialised on ``dist.device`` after ``fully_shard``: each rank
    allocates its shards only (uninitialised: fill them with :func:`init_shards`,
    :func:`load_shards` or :func:`load_sharded`), and the buffers get back the values the
    constructor gave them. A model already on ``dist.device`` keeps its values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.enabled:
        raise TrainingError("--fsdp shards the model over the ranks of a torchrun job: launch it with "
                            "torchrun --nproc_per_node N (N >= 2)")
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    mp = mixed_precision(bf16)
    on_meta = any(p.is_meta for p in model.parameters())
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if on_meta:
        buffers = dict(model.named_buffers(remove_duplicate=False))
        if any(b.is_meta for b in buffers.values()):
            raise TrainingError("--fsdp: the model's buffers were built on the meta device (build it with "
                                "rmkernels_train.fsdp.build_on_meta)")
        model.to_empty(device=dist.device)
        with torch.no_grad():
            for name, b in model.named_buffers(remove_duplicate=False):
                b.copy_(buffers[name])
    return model


def clip_grad_norm(parameters, max_norm):
    """``torch.nn.utils.clip_grad_norm_`` over sharded (DTensor) or plain gradients; returns
    the total norm before clipping as a float (all ranks agree)."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def original_class(model):
    """The HF class of a sharded model (FSDP2 makes a subclass ``FSDP<Name>``)."""
    from torch.distributed.fsdp import FSDPModule

    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    return type(model)


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optimizer": osd}


# What a torch.distributed.checkpoint ``.metadata`` pickle may name (recorded from torch 2.13's
# own files of model + AdamW states): the metadata module's own dataclasses and enums, the
# storage record, torch.Size, dtypes, layouts and the checkpoint path. Anything else is refused
# before it is built (torch's FileSystemReader reads the file with a plain ``pickle.load``, which
# would run whatever a planted file names).
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                     ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class UnsafeCheckpointError(ValueError):
    """A sharded checkpoint file names a Python object that a checkpoint does not hold."""


def _metadata_unpickler(f):
    import importlib
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            ok = (module, name) in _METADATA_GLOBALS
            if module == "torch":
                ok = ok or isinstance(getattr(torch, name, None), torch.dtype)
            elif module == _METADATA_MODULE:
                obj = getattr(importlib.import_module(module), name, None)
                ok = isinstance(obj, type) and obj.__module__ == module
            if not ok:
                raise UnsafeCheckpointError(f"it names {module}.{name}, which is not part of a checkpoint's "
                                            f"metadata (refused, never run)")
            return super().find_class(module, name)

    return Unpickler(f)


def read_sharded_metadata(path):
    """The ``.metadata`` of :func:`save_sharded`'s directory ``path``, unpickled with only the
    classes such a file holds (:data:`_METADATA_GLOBALS`): a planted file that names anything
    else is an :class:`UnsafeCheckpointError` and nothing of it runs. A file that is not such a
    pickle: ``ValueError``."""
    import pickle

    with open(os.path.join(path, ".metadata"), "rb") as f:
        try:
            md = _metadata_unpickler(f).load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
                ValueError, KeyError) as e:
            raise ValueError(f"not a checkpoint's metadata ({type(e).__name__}: {e})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata):
        raise ValueError(f"not a checkpoint's metadata (it holds a {type(md).__name__})")
    return md


def _safe_dcp_io(path):
    """torch.distributed.checkpoint's file reader and load planner with nothing unpickled that
    could run code: the metadata through :func:`read_sharded_metadata`, the non-tensor items
    (the optimizer's param_groups) through ``torch.load(weights_only=True)`` (torch's planner
    uses ``weights_only=False``; the tensors are already read with ``weights_only=True``)."""
    import io

    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # per-rank metadata files: not what save_sharded writes
                raise ValueError("per-rank checkpoint metadata is not supported")
            md = read_sharded_metadata(path)
            if getattr(md, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = torch.load(value, map_location="cpu", weights_only=True)
            buf = io.BytesIO()
            torch.save(obj, buf)  # only what weights_only admits: safe for torch's own load below
            buf.seek(0)
            super().load_bytes(read_item, buf)

    return Reader(path), Planner()


def _unwrapped(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` (torch.distributed.checkpoint's save or load) with its
    ``CheckpointException`` (a ``BaseException``, which no ``except Exception`` sees) replaced by
    the first rank's own exception: a disk full while saving stays an ``OSError``."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return fn(*args, **kwargs)
    except CheckpointException as e:
        excs = [pair[0] for pair in e.failures.values() if pair and isinstance(pair[0], Exception)]
        raise (excs[0] if excs else RuntimeError(str(e).strip().splitlines()[-1])) from None


def save_sharded(path, model, optimizer):
    """Every rank writes its shards of the model and the optimizer state into ``path``
    (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from rmkernels_train.trainer import fault_point

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            fault_point("shard-write")  # the tests' hook (a disk full on one rank); unset: nothing
            return super().write_data(plan, planner)

    _unwrapped(dcp.save, _state(model, optimizer), storage_writer=Writer(path))


class UnreadableShards(TrainingError):
    """:func:`load_sharded` could not read the shards for a reason that is damage (a file
    cut short, deleted, or holding what the safe reader refuses), not permissions: the
    trainer passes over the checkpoint to an older one. ``reason``: what the reader said."""

    def __init__(self, path, reason):
        super().__init__(f"--resume: cannot read the sharded state in {path} ({reason})")
        self.reason = reason


def load_sharded(path, model, optimizer):
    """Read :func:`save_sharded`'s directory into the sharded ``model`` and ``optimizer``
    (collective; the shapes must match). Nothing read can run code (:func:`_safe_dcp_io`).
    A file that cannot be read: :class:`UnreadableShards` (a :class:`TrainingError`), or a
    plain :class:`TrainingError` when permissions forbid it (not damage: the run stops)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    reader, planner = _safe_dcp_io(path)
    try:
        _unwrapped(dcp.load, state, storage_reader=reader, planner=planner)
    except Exception as e:
        msg = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        if isinstance(e, PermissionError):
            raise TrainingError(f"--resume: cannot read the sharded state in {path} ({msg})") from None
        raise UnreadableShards(path, msg) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model):
    """The whole model's state dict on rank 0 (CPU tensors; ``{}`` on other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_hf(path, model, state_dict):
    """An HF checkpoint of a sharded model in ``path`` (rank 0, with :func:`full_state_dict`'s
    result): ``config.json`` naming the original class and ``model.safetensors``."""
    from safetensors.torch import save_file

    cfg = copy.deepcopy(model.config)
    cfg.architectures = [original_class(model).__name__]
    cfg.save_pretrained(path)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def local_param_bytes(model):
    """Bytes of the parameters this rank holds (its shards under FSDP)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total


def state_digest(state_dict, names):
    """:func:`rmkernels_train.utils.param_digest` of the parameters ``names`` in a gathered
    state dict (the same value for the same weights)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode())
        h.update(state_dict[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def peak_rss_mib():
    """The process's peak resident memory so far, MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib():
    """``{"now": current, "peak": peak so far}`` resident memory of the process, MiB (``now``
    from /proc/self/statm: None where there is none)."""
    now = None
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return {"now": None if now is None else round(now, 1), "peak": round(peak_rss_mib(), 1)}


def ddp_bucket_bytes(ddp_model):
    """Bytes of the gradient buckets of a ``DistributedDataParallel`` wrapper (its own copy of
    the gradients, unless ``gradient_as_bucket_view``), as DDP reports them; None if it does
    not."""
    try:
        sizes = str(ddp_model._get_ddp_logging_data().get("bucket_sizes", ""))
        return sum(int(x) for x in sizes.replace(" ", "").split(",") if x)
    except (AttributeError, RuntimeError, ValueError):
        return None


def held_bytes(model, optimizer, ddp_model=None):
    """Bytes of the tensors this rank's training state holds now, by kind: ``params`` (its
    shards under FSDP), ``grads`` (the ``.grad`` tensors alive), ``optimizer_state`` (AdamW's
    state tensors), ``buffers`` (e.g. RoPE's ``inv_freq``), ``ddp_buckets``
    (:func:`ddp_bucket_bytes`, 0 without DDP)."""
    from torch.distributed.tensor import DTensor

    def nbytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    return {"params": sum(nbytes(p) for p in params),
            "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer_state": sum(nbytes(v) for st in optimizer.state.values() for v in st.values()
                                   if isinstance(v, torch.Tensor) and v.dim() > 0),
            "buffers": sum(nbytes(b) for b in model.buffers()),
            "ddp_buckets": (ddp_bucket_bytes(ddp_model) or 0) if ddp_model is not None else 0}


def memory_report(model, optimizer, device, *, start_rss=None, train_rss=None, marks=None, ddp_model=None,
                  live=None):
    """What this rank holds, in MiB: ``model_state`` = its parameters (its shards under FSDP)
    counted twice (weights and their gradients during a step) plus the optimizer's state
    tensors; ``peak_rss`` = the process's peak resident memory (with the end's checkpoint
    writing, which under --fsdp gathers the whole model on rank 0's CPU); ``start_rss`` (before
    the data and model) and ``train_peak_rss`` (by the end of the last training step) when
    given; ``rss_marks`` (``marks``: :func:`rss_mib` at named points of the run, in order);
    ``ddp_buckets`` (with ``ddp_model``, :func:`ddp_bucket_bytes`); on a GPU ``peak_cuda`` =
    the peak memory torch allocated. With ``live`` (``--profile-memory``: the figures of
    :class:`rmkernels_train.memory.LiveTensorProfile`, plus ``held_at_first_step_MiB``)
    ``live_tensors`` = those figures and ``peak_live_tensors`` = their ``peak_MiB``, the CPU
    analogue of ``peak_cuda``."""
    held = held_bytes(model, optimizer)
    params, opt = held["params"], held["optimizer_state"]
    out = {"model_state_MiB": round((2 * params + opt) / 2**20, 2), "params_MiB": round(params / 2**20, 2),
           "optimizer_state_MiB": round(opt / 2**20, 2), "peak_rss_MiB": round(peak_rss_mib(), 1)}
    if start_rss is not None:
        out["start_rss_MiB"] = round(start_rss, 1)
    if train_rss is not None:
        out["train_peak_rss_MiB"] = round(train_rss, 1)
    if marks:
        out["rss_marks_MiB"] = {**marks, "end": rss_mib()}
    buckets = ddp_bucket_bytes(ddp_model) if ddp_model is not None else None
    if buckets is not None:
        out["ddp_buckets_MiB"] = round(buckets / 2**20, 2)
    if live is not None:
        out["live_tensors"] = live
        out["peak_live_tensors_MiB"] = live["peak_MiB"]
    if device.type == "cuda":
        out["peak_cuda_MiB"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
