"""Fully sharded training (FSDP2, `torch.distributed.fsdp.fully_shard`) with a colocated
generation engine: `resources.train.distributed: fsdp`.

The trainer shards its networks itself rather than through accelerate's FSDP plugin:
accelerate only enables FSDP on accelerators, and this path has to run (and be tested) on CPU
with gloo as well. What sharding needs beyond the data-parallel loop lives here:

- `shard`: one FSDP unit per decoder layer, the untied embedding and LM head, and the root,
  with FSDP's mixed precision (weights gathered in the compute dtype, gradients reduced in
  float32) over float32 master weights, as the authors' verl FSDP workers run it. The frozen
  reference is sharded the same way.
- `full_weights`: the policy's full weights, gathered one tensor at a time in the engine's
  dtype, for the engine's weight sync and for saving the model; no second full float32 copy
  ever exists.
- `save_sharded` / `load_sharded`: model and optimizer state in torch.distributed.checkpoint
  format, each process writing and reading its own shards.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Iterator

import torch

DISTRIBUTED_KEY = "resources.train.distributed"
MODES = ("ddp", "fsdp", "deepspeed")


def block_classes(model: torch.nn.Module) -> set[str]:
    """The transformer block classes of a Hugging Face model (its `_no_split_modules`): the
    units FSDP gathers one at a time."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"{type(model).__name__} names no transformer block class (_no_split_modules); "
            f"{DISTRIBUTED_KEY}: fsdp cannot tell its layers apart, use ddp"
        )
    return names


def shard(model: torch.nn.Module, compute_dtype: torch.dtype, device_type: str) -> torch.nn.Module:
    """Shard `model` in place over all processes: each transformer block a unit, the rest the
    root unit. Weights are gathered in `compute_dtype` for the forward and backward (FSDP's
    mixed precision: no autocast copy of the full model), gradients reduce-scattered in float32
    into float32 shards, so AdamW keeps float32 state."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    param_dtype = None if compute_dtype == torch.float32 else compute_dtype
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit in units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules sharded as units of their own, below the root: every transformer block,
    and the input embedding and LM head when they are not tied (a tied weight must stay in
    one unit: the root's). Each is gathered only while it computes, so the root unit in
    flight holds just the final norm (and a tied embedding)."""
    blocks = block_classes(model)
    out = [m for m in model.modules() if type(m).__name__ in blocks]
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or head.weight is not embedding.weight:
        out.append(embedding)
        if head is not None:
            out.append(head)
    return out


def full_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every entry of `model`'s state dict, as the Hugging Face
    checkpoint names them. A tensor tied under two names is yielded under both: vLLM's CPU
    backend repacks the LM head apart from the embedding, and updates it only from its own
    name.

    A sharded tensor is cast to `dtype` shard by shard and then gathered, one tensor at a time:
    what a caller holds is one gathered tensor in `dtype`, never the full model twice. Every
    process must consume the iterator to the end in the same order (each gather is a
    collective). Tensors of an unsharded model are yielded as they are, cast when `dtype` is
    given."""
    from torch.distributed.tensor import DTensor

    for name, tensor in model.state_dict().items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


def save_sharded(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Every process writes its shards of the model and of the optimizer state under `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint pickles its `.metadata` file; this reads it allowing only
    the classes such metadata is made of (its own dataclasses, torch sizes and dtypes), so a
    crafted file cannot run code (the tensors themselves are read with `weights_only=True`)."""

    PLAIN = {("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
             ("pathlib", "PosixPath"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module, name):
        torch_value = module == "torch" and isinstance(getattr(torch, name, None),
                                                       (torch.dtype, torch.layout, torch.memory_format))
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in self.PLAIN or torch_value:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata; refusing to load it")


def safe_reader(path: Path):
    """A torch.distributed.checkpoint reader of `path` whose metadata is read by
    `_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(self._get_metadata_path(kwargs.get("rank")), "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(path))


def load_sharded(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Load what `save_sharded` wrote into the sharded model and its optimizer (same number of
    processes), executing nothing the files hold (`safe_reader`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not path.is_dir():
        raise FileNotFoundError(f"no sharded state at {path}")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, storage_reader=safe_reader(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
