"""Environment: torch and its CUDA, the driver, every GPU and its memory, the packages the systems
use (a missing one is listed with what it disables), and the CPU threads in use."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess

from alignment.doctor.context import Context
from alignment.doctor.report import CheckResult, Figure

# distribution -> (what needs it, required?)
PACKAGES = {
    "transformers": ("every model", True),
    "accelerate": ("GRPO and the HF trainers", True),
    "trl": ("GRPO (TRL's GRPOTrainer)", True),
    "fastapi": ("the scorer service", True),
    "uvicorn": ("the scorer service", True),
    "httpx": ("the scorer client", True),
    "tensorboard": ("metrics (TensorBoard event files)", True),
    "sacrebleu": ("the persona reward (BLEU)", True),
    "rouge-score": ("the persona reward (ROUGE-L)", True),
    "vllm": ("ES --backend vllm and GRPO use_vllm (transformers engines still work)", False),
    "ray": ("ES --executor ray: engines on several GPUs and nodes", False),
    "deepspeed": ("GRPO's ZeRO-2/3 accelerate configs (DDP still works)", False),
    "wandb": ("--wandb logging (TensorBoard and metrics.jsonl still work)", False),
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi (torch does not expose it), if there is one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def run_environment(ctx: Context) -> CheckResult:
    import torch

    from alignment.cli import allotted_cpus

    figures = [
        Figure("python", platform.python_version()),
        Figure("torch", torch.__version__),
        Figure("torch CUDA build", torch.version.cuda or "none (CPU build)"),
    ]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ctx.on_gpu:
        figures.append(Figure("NVIDIA driver", _driver() or "unknown (no nvidia-smi)"))
        figures.append(
            Figure("GPUs visible", float(gpus), target=">= 1", verdict="met" if gpus else "missed")
        )
        for k in range(gpus):
            props = torch.cuda.get_device_properties(k)
            free, total = torch.cuda.mem_get_info(k)
            figures.append(Figure(f"cuda:{k} {props.name}", total / 2**30, "GiB",
                                  note=f"{free / 2**30:.1f} GiB free; compute capability {props.major}.{props.minor}, "
                                  f"{props.multi_processor_count} SMs; bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}"))  # fmt: skip
    else:
        why = "--device cpu" if torch.version.cuda else "a CPU build of torch"
        figures.append(
            Figure("GPUs", "not used", note=f"{why}: every GPU part of the checks is reported not run")
        )
    for dist, (what, required) in PACKAGES.items():
        version = _version(dist)
        if version is not None:
            figures.append(Figure(dist, version))
        elif required:
            figures.append(
                Figure(dist, "MISSING", target="installed", verdict="missed", note=f"needed by {what}")
            )
        else:
            figures.append(Figure(dist, "not installed", note=f"disables {what}"))
    threads = torch.get_num_threads()
    figures.append(Figure("CPU threads (torch)", float(threads),
                          note=f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
                          f"{allotted_cpus()} cores allotted to this job, {os.cpu_count()} on the host"))  # fmt: skip
    return CheckResult.from_figures(
        "environment", "Environment: torch, CUDA, GPUs, packages, threads", figures
    )
