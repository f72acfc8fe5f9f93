"""What ``ICECallback`` needs of the training strategy: which strategies it refuses, the check that every rank
holds the edit it wrote (DDP: the same bytes; FSDP2: each rank's shards), and the reset of the optimizer state
of the edited weights."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, XLAStrategy
from lightning.pytorch.utilities import rank_zero_warn

from ..core.editing import tensor_sha256
from ..core.sharding import is_sharded

__all__ = ["check_strategy", "check_ranks_agree", "check_shards", "reset_optimizer_state", "shard_denoisers"]

# The block lists of the denoisers, each block one FSDP2 unit (UNets; SD3, Flux, PixArt, CogVideoX, LTX; Wan).
_BLOCK_LISTS = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks", "blocks")

# Lightning's FSDPStrategy (FSDP1: flat parameters) and DeepSpeed hide the weights' rows behind flattened
# buffers; ModelParallelStrategy (FSDP2, fully_shard) keeps each weight a row-sharded DTensor, which the edit
# handles shard by shard.
_REFUSED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, XLAStrategy)


def shard_denoisers(models, mesh) -> None:
    """FSDP2 (``fully_shard``) over the data-parallel part of ``mesh``: each block of every denoiser, then the
    whole, as diffusers' and torchtitan's FSDP2 recipes wrap transformer blocks."""
    from torch.distributed.fsdp import fully_shard

    dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    for model in models:
        for name in _BLOCK_LISTS:
            blocks = getattr(model, name, None)  # a ModuleList of blocks, or one block (mid_block), or none
            for block in blocks if isinstance(blocks, torch.nn.ModuleList) else [blocks] if blocks else []:
                fully_shard(block, mesh=dp)
        fully_shard(model, mesh=dp)


def check_strategy(trainer: Trainer) -> None:
    """Refuse, before training, a strategy whose flattened weights the edit cannot address."""
    if isinstance(trainer.strategy, _REFUSED_STRATEGIES):
        raise RuntimeError(
            f"ICECallback does not support {type(trainer.strategy).__name__}: it flattens the weights, so the "
            "rows of a text-conditioning layer are not a shard of its own. Shard with "
            "ModelParallelStrategy (torch FSDP2, fully_shard in your module's configure_model), which "
            "ICECallback edits shard by shard, or train on one device or with DDP"
        )


def check_ranks_agree(trainer: Trainer, modules: dict[str, torch.nn.Linear], digest: list[str]) -> list[str]:
    """Under DDP, check that every rank holds byte-identical edited weights (``digest``: this rank's hash
    per layer); take rank 0's if not. Returns the hashes of the weights each rank now holds.

    The edit is deterministic and every rank starts from the same weights and operator, so the check
    (one hash per layer) normally passes; the fallback keeps a rank from silently drifting."""
    if trainer.world_size <= 1:
        return digest
    if any(is_sharded(m.weight) for m in modules.values()):
        return check_shards(trainer, modules, digest)
    differs = float(trainer.strategy.broadcast(digest, src=0) != digest)
    flag = torch.tensor(differs, device=trainer.strategy.root_device)
    if float(trainer.strategy.reduce(flag, reduce_op="sum")) > 0:
        rank_zero_warn("ICECallback: ranks disagreed on the edited weights; taking rank 0's")
        weights = trainer.strategy.broadcast({n: m.weight.detach().cpu() for n, m in modules.items()}, src=0)
        for n, m in modules.items():
            m.weight.copy_(weights[n].to(m.weight.device))
        return [tensor_sha256(m.weight) for m in modules.values()]
    return digest

def check_shards(trainer: Trainer, modules: dict[str, torch.nn.Linear], digest: list[str]) -> list[str]:
    """Sharded weights: every rank checks that each of its shards holds exactly what its edit wrote; the
    failures are summed over ranks (any one fails every rank, naming the layers), and the per-shard hashes
    of all ranks, in rank order, are returned (the same list on every rank)."""
    bad = [n for (n, m), d in zip(modules.items(), digest, strict=True) if tensor_sha256(m.weight) != d]
    flag = torch.tensor(float(len(bad)), device=trainer.strategy.root_device)
    if float(trainer.strategy.reduce(flag, reduce_op="sum")) > 0:
        raise RuntimeError(
            f"ICECallback: after the edit, rank {trainer.global_rank}'s shards of {bad[:3]} (or another rank's) "
            "do not hold the edited rows; the sharded model is inconsistent: reload it from the last checkpoint"
        )
    gathered = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, digest)
    return [h for rank in gathered for h in rank]

def reset_optimizer_state(trainer: Trainer, modules: dict[str, torch.nn.Module]) -> None:
    """Reset the optimizer state (Adam's moments and step) of the edited weights to what a fresh state
    is: stale moments would push the weights straight back along the erased directions. The state is
    zeroed in place rather than dropped, so a (sharded) checkpoint still holds an entry for every
    parameter, as torch's distributed checkpoint expects when it loads one."""
    params = {id(m.weight) for m in modules.values()}
    for opt in trainer.optimizers:
        for p, state in opt.state.items():
            if id(p) in params:
                for k, v in state.items():
                    if isinstance(v, torch.Tensor):
                        v.zero_()
                    elif isinstance(v, (int, float)):
                        state[k] = type(v)(0)
