"""Memory: peak resident set size of one training process, full fine-tuning versus LoRA, on the same batches.

Each configuration runs in a fresh Python process (a peak RSS is a lifetime maximum, so processes are not shared)
that does what a Ray Train worker does per step: load the model with ``sftray.models.loading.load_model``, apply
LoRA from the shipped ``conf/train/lora.yaml`` (``sftray.models.lora.apply_lora``), the loop's optimizer over the
trainable parameters (``sftray.train.step.build_optimizer``), then ``memory_steps`` of the loop's
``optimizer_step`` on packed rows collated as the loop does.
Peak RSS is the process's high-water mark ``VmHWM`` from ``/proc/self/status``, not ``getrusage().ru_maxrss``:
Linux carries the parent's resident size across fork + exec into ``ru_maxrss``, so a child of the (large) bench
process would report the parent's footprint. The process holds no Ray runtime: a Ray worker adds its own fixed
baseline on top of these figures.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SECTION = "memory"
METHODS = ("full", "lora")


def measure_memory(
    *, model_dir: Path, rows: list[dict], rows_per_step: int, max_seq_len: int, steps: int, threads: int
) -> list[dict]:
    """One row per method: peak RSS, RSS after imports and after model load, and trainable parameters (MiB)."""
    from sftray.config import compose_config

    lora = dataclasses.asdict(compose_config(["train=lora"]).train.lora)
    out = []
    with tempfile.TemporaryDirectory(prefix="sftray-bench-mem-") as tmp:
        batches = Path(tmp) / "rows.json"
        batches.write_text(json.dumps(rows))
        for method in METHODS:
            job = {
                "model_dir": str(model_dir),
                "rows": str(batches),
                "rows_per_step": rows_per_step,
                "max_seq_len": max_seq_len,
                "steps": steps,
                "threads": threads,
                "method": method,
                "lora": lora,
            }
            proc = subprocess.run(
                [sys.executable, "-m", "sftray.bench.memory", json.dumps(job)], capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise RuntimeError(f"memory bench ({method}) failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            out.append(
                {
                    "section": SECTION,
                    "name": f"{method} fine-tuning" if method == "full" else "LoRA (conf/train/lora.yaml)",
                    "method": method,
                    **result,
                }
            )
    return out


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in the fresh process: returns the RSS figures (MiB) as one JSON-able dict."""
    import torch
    from transformers import AutoTokenizer

    from sftray.config import LoraConfig, TrainConfig
    from sftray.data.collate import collate_rows
    from sftray.models.loading import load_model
    from sftray.models.lora import apply_lora
    from sftray.train.step import build_optimizer, optimizer_step

    def peak_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
        raise RuntimeError("no VmHWM in /proc/self/status: the memory bench needs Linux")

    torch.set_num_threads(job["threads"])
    after_imports = peak_mib()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    torch.manual_seed(0)
    model, new_ids = load_model(job["model_dir"], tokenizer=tokenizer)
    if job["method"] == "lora":
        model = apply_lora(model, cfg=LoraConfig(**job["lora"]), new_token_ids=new_ids)
    model.train()
    after_load = peak_mib()
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(method=job["method"], parallelism="ddp", lr=1e-4, weight_decay=0.0, max_grad_norm=1.0)
    optimizer = build_optimizer(params, cfg=cfg)
    rows = json.loads(Path(job["rows"]).read_text())
    n = job["rows_per_step"]
    for step in range(job["steps"]):
        chunk = [rows[(step * n + i) % len(rows)] for i in range(n)]
        batch = collate_rows(
            {k: [r[k] for r in chunk] for k in chunk[0]},
            pad_id=tokenizer.pad_token_id,
            packed=True,
            pad_to=job["max_seq_len"],  # the widest micro-batch the loop can build: the peak to plan for
        )
        optimizer_step(model, optimizer, [batch], cfg=cfg, device=torch.device("cpu"), world=1, bf16=False)
    return {
        "peak_rss_mib": peak_mib(),
        "after_imports_mib": after_imports,
        "after_model_load_mib": after_load,
        "training_increment_mib": peak_mib() - after_load,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in params),
        "steps": job["steps"],
        "batch_shape": [n, job["max_seq_len"]],
    }


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
