"""``--fsdp``: the reward model sharded with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

- :func:`shard`: ``fully_shard`` on every decoder layer (the classes the HF model lists in
  ``_no_split_modules``) and on the root, over a 1-D mesh of all ranks (NCCL on GPUs, gloo on
  CPU). Parameters stay float32 (the optimizer's master copy); ``--bf16`` is a
  ``MixedPrecisionPolicy`` (bf16 compute, float32 gradient reduction) instead of autocast.
  The root's forward is the patched one (``rmk.patch_hf_reward_model``, or the packed
  forward of :mod:`rmkernels_train.packing`), so the fused ``rmk.pairwise_reward_loss`` runs
  inside it while the root's parameters (embeddings, final norm, ``score``) are gathered.
- :func:`clip_grad_norm`: the total gradient norm over the sharded (DTensor) gradients, the
  same on every rank, and the clipping.
- :func:`save_sharded` / :func:`load_sharded`: model and optimizer state as a
  ``torch.distributed.checkpoint`` directory (every rank writes and reads its own shards;
  no pickled objects are executed).
- :func:`full_state_dict`: the whole model gathered on rank 0 (CPU), for the HF checkpoint
  that ``from_pretrained`` loads (:func:`save_hf`).
"""
import copy
import os
import warnings

import torch

from rmkernels_train.utils import TrainingError

DCP_DIR = "sharded"  # the torch.distributed.checkpoint directory inside checkpoint-<step>/


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


def shard(model, dist, *, bf16=False):
    """Shard ``model`` (already on ``dist.device``) in place over all ranks. Returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.enabled:
        raise TrainingError("--fsdp shards the model over the ranks of a torchrun job: launch it with "
                            "torchrun --nproc_per_node N (N >= 2)")
    # The root returns the rewards as a view ([2B, 1]); nothing here changes it in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    mp = mixed_precision(bf16)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
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


def save_sharded(path, model, optimizer):
    """Every rank writes its shards of the model and the optimizer state into ``path``
    (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer), checkpoint_id=path)


def load_sharded(path, model, optimizer):
    """Read :func:`save_sharded`'s directory into the sharded ``model`` and ``optimizer``
    (collective; the shapes must match)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
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


def memory_report(model, optimizer, device, *, start_rss=None, train_rss=None):
    """What this rank holds, in MiB: ``model_state`` = its parameters (its shards under FSDP)
    counted twice (weights and their gradients during a step) plus the optimizer's state
    tensors; ``peak_rss`` = the process's peak resident memory (with the end's checkpoint
    writing, which under --fsdp gathers the whole model on rank 0's CPU); ``start_rss`` (before
    the data and model) and ``train_peak_rss`` (by the end of the last training step) when
    given; on a GPU ``peak_cuda`` = the peak memory torch allocated."""
    from torch.distributed.tensor import DTensor

    def nbytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = local_param_bytes(model)
    opt = sum(nbytes(v) for st in optimizer.state.values() for v in st.values()
              if isinstance(v, torch.Tensor) and v.dim() > 0)
    out = {"model_state_MiB": round((2 * params + opt) / 2**20, 2),
           "peak_rss_MiB": round(peak_rss_mib(), 1)}
    if start_rss is not None:
        out["start_rss_MiB"] = round(start_rss, 1)
    if train_rss is not None:
        out["train_peak_rss_MiB"] = round(train_rss, 1)
    if device.type == "cuda":
        out["peak_cuda_MiB"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
