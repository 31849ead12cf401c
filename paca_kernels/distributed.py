"""Helpers for data-parallel training of PaCa models: FSDP2 sharding per block.

DDP needs nothing special: ``DistributedDataParallel(model)`` works as is (every parameter takes part in
every forward, so ``find_unused_parameters`` can stay False), as does ``torch.compile`` of the wrapped model.
FSDP2 (``torch.distributed.fsdp.fully_shard``) needs one thing beyond the usual "shard each block, then
the root": PaCaViT calls its blocks through ``PaCaBlock.forward_logits``, not ``__call__``, so that method
must be registered with FSDP, or the block's parameters are never all-gathered before it runs (the
failure reads "got mixed torch.Tensor and DTensor"). :func:`fully_shard_paca` does both.

``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` converts the BatchNorm layers of the clustering teacher
(``PaCaTeacher_ConvMixer``); PyTorch's SyncBatchNorm trains on CUDA (and XPU/HPU) only, and raises
"SyncBatchNorm expected input tensor to be on GPU ..." for CPU inputs in training mode.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from .models.paca_vit import PaCaTeacher_ConvMixer
from .nn.block import PaCaBlock

__all__ = ["fully_shard_paca"]


def fully_shard_paca(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """Shard ``model`` with FSDP2, one unit per PaCa block, in place; returns ``model``.

    Units (each all-gathers its parameters just before it runs and frees them after):
    every :class:`~paca_kernels.nn.block.PaCaBlock` (with ``forward_logits`` registered as a forward
    method), every mixer unit ``block{i}[j]`` of a :class:`PaCaTeacher_ConvMixer` (the units its
    activation checkpointing calls) and the teacher itself, then the root (stem, transitions, norms,
    head). Works on any model holding PaCaBlocks, not only PaCaViT.

    Args:
        model: a PaCaViT (or any module with PaCaBlocks), on the training device, not yet wrapped.
        **fsdp_kwargs: passed to every ``fully_shard`` call (``mesh``, ``reshard_after_forward``,
            ``mp_policy``, ``offload_policy``, ...). Without ``mesh``: a 1-D mesh over the default process
            group (which must be initialised) on the device type of the model's parameters. (FSDP2's own
            default is a CUDA mesh whenever CUDA is available, which would move a CPU model to the GPU.)

    FSDP2 warns once per block class that the block "returned a view tensor" (the cluster logits): an
    in-place op on that output would skip FSDP's pre-backward hook. PaCaViT never modifies block outputs
    in place; code of your own that consumes ``forward_logits`` should not either.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        RuntimeError: no ``mesh`` was given and ``torch.distributed`` is not initialised.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if fsdp_kwargs.get("mesh") is None and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "fully_shard_paca: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (or pass mesh=)"
        )
    if fsdp_kwargs.get("mesh") is None:
        from torch.distributed.device_mesh import init_device_mesh

        param = next(model.parameters(), None)
        device_type = param.device.type if param is not None else "cpu"
        fsdp_kwargs["mesh"] = init_device_mesh(device_type, (dist.get_world_size(),))
    # Innermost units first: fully_shard on a parent skips parameters that children already manage.
    for module in list(model.modules()):
        if isinstance(module, PaCaBlock):
            fully_shard(module, **fsdp_kwargs)
            # PaCaViT runs blocks as block.forward_logits(...), which bypasses Module.__call__ and so the
            # FSDP pre/post-forward hooks; registering the method wraps it with the same hooks.
            register_fsdp_forward_method(module, "forward_logits")
        elif isinstance(module, PaCaTeacher_ConvMixer):
            for i in range(module.num_stages):
                for unit in getattr(module, f"block{i + 1}"):
                    fully_shard(unit, **fsdp_kwargs)
    for module in list(model.modules()):
        if isinstance(module, PaCaTeacher_ConvMixer) and module is not model:
            fully_shard(module, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model
