"""Training precision: whether a run's ``train.precision`` means bf16 compute on its device."""

from __future__ import annotations

import torch


def use_bf16(precision: str, device: torch.device) -> bool:
    """True when the forward and backward run under bf16 autocast (FSDP: a bf16 MixedPrecisionPolicy).

    ``auto`` picks bf16 only on a GPU that supports it: on a CPU the gain depends on bf16 matrix instructions
    (AVX512-BF16; CPUs without them gain nothing), and bf16 changes the numbers a run produces, so a CPU user
    opts in. ``bf16`` asks for it anywhere it can run.
    """
    if precision == "fp32":
        return False
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return gpu_bf16
    if precision == "bf16":
        if device.type == "cuda" and not gpu_bf16:
            raise ValueError(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support")
        return True
    raise ValueError(f"train.precision={precision!r}: expected one of auto, fp32, bf16")
