"""``train.parallelism=auto``, decided once on the driver: a model replica's memory against a worker's memory.

The driver decides, so every rank gets the same choice in its job's config (``WorkerJob.cfg``) and nothing has to be
agreed on between ranks. It sizes the model from the safetensors headers of the base model's weights (names and
shapes, no tensor read and no model class imported) and a worker's memory from the cluster: on GPU the device's total
memory, on CPU the node's memory as Ray schedules it divided by the workers placed on that node.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct
from pathlib import Path

from sftray.config import Config, LoraConfig, TrainConfig
from sftray.core.parallel import choose_parallelism, replica_bytes

log = logging.getLogger("sftray.train")

GIB = 1024**3


def resolve_parallelism(cfg: Config, *, base_model: str) -> Config:
    """``cfg`` with ``train.parallelism`` decided when it is ``auto`` (the choice logged at INFO), else unchanged."""
    t = cfg.train
    if t.parallelism != "auto":
        return cfg
    if t.num_workers == 1:
        choice = "ddp"
        log.info("train.parallelism=auto: ddp (one worker: nothing to shard)")
    else:
        shapes, vocab_size = weight_shapes(base_model)
        if not shapes:
            choice = "fsdp"
            log.info("train.parallelism=auto: fsdp (no local safetensors weights in %s to size the model)", base_model)
        else:
            params, trainable = count_parameters(shapes, vocab_size=vocab_size, method=t.method, lora=t.lora)
            replica = replica_bytes(params=params, trainable=trainable)
            memory, where = worker_memory(t)
            choice = choose_parallelism(replica=replica, worker_memory=memory)
            log.info(
                "train.parallelism=auto: %s (a replica with gradients and AdamW state: %.2f GiB for %d parameters, "
                "%d trainable; a worker's memory: %.2f GiB, %s)",
                choice,
                replica / GIB,
                params,
                trainable,
                memory / GIB,
                where,
            )
    return dataclasses.replace(cfg, train=dataclasses.replace(t, parallelism=choice))


def count_parameters(
    shapes: dict[str, list[int]], *, vocab_size: int | None, method: str, lora: LoraConfig
) -> tuple[int, int]:
    """(parameters, trainable parameters) of the model being trained, from its weights' names and shapes.

    Full fine-tuning trains every parameter. LoRA adds ``r x (in + out)`` per adapted linear layer (a 2-D weight
    named by ``lora.target_modules``; ``all-linear``: every 2-D weight except those with ``vocab_size`` rows, the
    embedding and the LM head, as peft leaves the output layer out) and trains copies of ``lora.modules_to_save``.
    """
    params = sum(math.prod(shape) for shape in shapes.values())
    if method == "full":
        return params, params
    trainable = 0
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if module == name or len(shape) != 2:
            continue
        if _adapted(module, rows=shape[0], vocab_size=vocab_size, targets=lora.target_modules):
            trainable += lora.r * (shape[0] + shape[1])
    saved = sum(
        math.prod(shape)
        for name, shape in shapes.items()
        if any(part in lora.modules_to_save for part in name.split("."))
    )
    return params + trainable + saved, trainable + saved


def _adapted(module: str, *, rows: int, vocab_size: int | None, targets: list[str]) -> bool:
    if targets == ["all-linear"]:
        return rows != vocab_size
    return module.rsplit(".", 1)[-1] in targets


def weight_shapes(base_model: str) -> tuple[dict[str, list[int]], int | None]:
    """({tensor name: shape} from every ``*.safetensors`` header of a local model folder, its ``vocab_size``); a hub
    id is looked up in the local Hugging Face cache; ({}, None) when no weights are found there."""
    folder = Path(base_model)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(base_model, allow_patterns=["*.json", "*.safetensors"], local_files_only=True)
            )
        except Exception:  # not downloaded yet (or not a hub id): the caller falls back to fsdp
            return {}, None
    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        shapes.update(_header_shapes(file))
    config = folder / "config.json"
    vocab_size = json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
    return shapes, vocab_size


def _header_shapes(file: Path) -> dict[str, list[int]]:
    """A safetensors file's tensor shapes: its header is an 8-byte little-endian length, then that much JSON."""
    with file.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: info["shape"] for name, info in header.items() if name != "__metadata__"}


def worker_memory(t: TrainConfig) -> tuple[int, str]:
    """(bytes a worker may use, where the figure comes from): a GPU's total memory, or on CPU the smallest share of
    a node's memory among the nodes Ray Train would place workers on (it packs them onto as few nodes as it can)."""
    import ray

    if t.use_gpu:
        # asked on a GPU worker: the driver may have no GPU, or another kind
        return ray.get(ray.remote(num_gpus=1, num_cpus=0)(_gpu_memory).remote()), "the GPU's total memory"
    shares = []
    for node in ray.nodes():
        resources = node.get("Resources", {})
        fits = int(resources.get("CPU", 0.0) / t.cpus_per_worker + 1e-9)
        if node.get("Alive") and fits >= 1 and resources.get("memory"):
            shares.append(int(resources["memory"] / min(fits, t.num_workers)))
    if not shares:  # no single node has room for a worker yet (an autoscaling cluster): assume the worst
        return 0, "no node has room for a worker now"
    return min(shares), "a node's Ray memory divided by the workers on it"


def _gpu_memory() -> int:
    """The total memory of the GPU this process was given (a Ray task's)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory
