"""Sharded weights (torch FSDP2, ``fully_shard``): one home for what the edit, the probe, the callback and the
export need to know about them, checked with ``isinstance`` against torch's public types (``DTensor``,
``FSDPModule``), never by name.

FSDP2 keeps each weight a row-sharded ``DTensor``. The edit ``W (I - D)`` mixes a weight's input columns only, so
each rank edits the rows it holds (:func:`local_shard`); outputs, not weights, travel (:func:`gather_columns`);
only an export gathers whole components, onto rank 0's CPU (:func:`gather_pipeline`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["is_sharded", "reshard", "local_shard", "like_weight", "gather_columns", "unsharded_class",
           "gather_pipeline"]  # fmt: skip


def _dtensor_type():
    if not torch.distributed.is_available():
        return ()
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter of a module sharded with FSDP2's ``fully_shard``)."""
    return isinstance(t, _dtensor_type())


def reshard(models) -> None:
    """Put every FSDP2 unit inside ``models`` back in its sharded state. FSDP2 swaps a unit's parameters for
    gathered copies during a forward pass, and keeps the root unit's gathered after a forward without backward
    (a check pass, a validation step): an edit written there would be lost at the next reshard. After this,
    each ``module.weight`` is the persistent row shard."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2: nothing can be sharded
        return
    for model in models:
        for unit in model.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()


def local_shard(t: Tensor) -> Tensor:
    """The rows of a sharded ``DTensor`` weight this rank holds (a view: writing it writes the parameter);
    any other tensor as it is."""
    return t.to_local() if is_sharded(t) else t


def like_weight(value: Tensor, weight: Tensor) -> Tensor:
    """``value``, computed from :func:`local_shard` of ``weight``, as a tensor laid out like ``weight`` (a
    ``DTensor`` with its mesh and placements when ``weight`` is one), so code that multiplies by whole weights
    works on shards unchanged."""
    if not is_sharded(weight):
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape,
                              stride=weight.stride())  # fmt: skip


def gather_columns(local: Tensor, weight) -> Tensor:
    from torch.distributed.tensor import DTensor, Shard

    if len(weight.placements) != 1 or weight.placements[0] != Shard(0):
        raise NotImplementedError(f"weights sharded as {weight.placements}; ICE supports row sharding (Shard(0))")
    n, out = local.shape[0], weight.shape[0]
    dev = weight.device_mesh.device_type
    full = DTensor.from_local(local.to(dev), weight.device_mesh, [Shard(1)], run_check=False, shape=(n, out),
                              stride=(out, 1)).full_tensor()  # fmt: skip
    return full.to(local.device)


def _fsdp_module_type() -> tuple[type, ...]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2: nothing can be sharded
        return ()
    return (FSDPModule,)


def _peft_tuner_types() -> tuple[type, ...]:
    """PEFT's adapter layers (LoRA and the other tuners), when PEFT is installed."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return ()
    return (BaseTunerLayer,)


def unsharded_class(module: nn.Module) -> type:
    """The model class of ``module``: ``fully_shard`` swaps a sharded module's class for a subclass of
    ``FSDPModule`` and the original; this is the original (the module's own class when it is not sharded)."""
    fsdp = _fsdp_module_type()
    if not (fsdp and isinstance(module, fsdp)):
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, fsdp[0]) and issubclass(c, nn.Module))


def gather_pipeline(pipeline):
    """A copy of ``pipeline`` whose sharded components (FSDP2 ``DTensor`` parameters) are whole, on rank 0's
    CPU; ``None`` on the other ranks. A collective: every rank calls it. Each sharded component's full state
    dict is gathered with ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` (``full_state_dict``,
    ``cpu_offload``: only rank 0 holds it) into a new instance of its class; the other components are shared."""
    import inspect

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank0 = dist.get_rank() == 0
    whole = {}
    for name, comp in pipeline.components.items():
        if isinstance(comp, torch.nn.Module) and any(is_sharded(p) for p in comp.parameters()):
            if any(isinstance(m, _peft_tuner_types()) for m in comp.modules()):
                raise NotImplementedError(
                    f"the sharded {name} holds LoRA adapters; exporting a sharded LoRA fine-tune is not supported: "
                    "train the adapters with DDP (they are small), or merge them before sharding"
                )
            state = get_model_state_dict(comp, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank0:
                copy = unsharded_class(comp).from_config(comp.config)
                # own copies, in their dtypes: on a CPU mesh a gathered tensor may alias FSDP's buffers
                copy.load_state_dict({k: v.detach().clone() for k, v in state.items()}, assign=True)
                whole[name] = copy.eval()
    if not rank0:
        return None
    components = {**pipeline.components, **whole}
    params = inspect.signature(type(pipeline).__init__).parameters  # e.g. Wan 2.2's boundary_ratio
    settings = {k: v for k, v in pipeline.config.items() if k in params and k not in components}
    return type(pipeline)(**components, **settings)
