"""Data parallelism: FSDP2 (``fully_shard`` per decoder layer, then the root, on an explicit mesh) or DDP, and the
rule that picks one for ``train.parallelism=auto``.

``ray.train.torch.prepare_model(parallel_strategy="fsdp")`` is FSDP1 and refuses to run without CUDA, so FSDP2 is
applied here directly; it works with gloo on CPU and NCCL on GPU alike. Parameters stay float32 (uniform dtype,
which FSDP2 needs when peft adds fp32 adapters); bf16 compute on GPU comes from a MixedPrecisionPolicy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PARAM_BYTES = 4
"""Bytes per parameter as trained: weights (and so gradients) stay float32 whatever the checkpoint's dtype."""
ADAMW_STATE_BYTES = 2 * 4
"""AdamW's two float32 moments per trainable parameter."""
REPLICA_SHARE = 0.5
"""DDP only when a full replica takes at most this share of a worker's memory: the rest holds DDP's gradient buckets
(a second copy of the gradients), activations, the eval's generation and the allocator's slack."""


def replica_bytes(*, params: int, trainable: int) -> int:
    """Memory of one full replica being trained: every parameter, the gradients of the trainable ones and their
    AdamW state (activations are left to ``REPLICA_SHARE``'s room)."""
    return params * PARAM_BYTES + trainable * (PARAM_BYTES + ADAMW_STATE_BYTES)


def choose_parallelism(*, replica: int, worker_memory: int) -> str:
    """ddp when a replica (``replica_bytes``) fits a worker's memory with room to spare (``REPLICA_SHARE``), else
    fsdp: FSDP2 shards the replica across the workers, at a CPU cost per step that DDP does not pay."""
    return "ddp" if replica <= REPLICA_SHARE * worker_memory else "fsdp"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the classes transformers marks ``_no_split_modules`` (peft-wrapped too)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules: cannot find its decoder layers")
    return layers


def wrap(model: nn.Module, *, parallelism: str, device: torch.device, world_size: int, bf16: bool) -> nn.Module:
    """Shards (fsdp) or replicates (ddp) ``model`` across the process group; returns the module to train."""
    if parallelism == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world_size,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs: dict[str, Any] = {"mesh": mesh}
        if policy is not None:
            kwargs["mp_policy"] = policy
        layers = decoder_layers(model)
        for i, layer in enumerate(layers):
            # Backward starts with the last layer, right after forward: freeing its gathered weights only to gather
            # them again at once is a wasted all-gather (torchtitan's default too). The others free theirs. FSDP2
            # already keeps the root's own parameters (embeddings, head) gathered for the same reason.
            fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kwargs)
        fully_shard(model, **kwargs)
        return model
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    raise ValueError(f"parallelism={parallelism!r}; valid: fsdp, ddp")


def unwrap(model: nn.Module) -> nn.Module:
    """The module with the HF API (generate, save_pretrained): DDP wraps it, FSDP2 modifies it in place."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
