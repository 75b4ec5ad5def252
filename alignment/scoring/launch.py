"""Start scorer services as child processes: one for the demo, tests and benchmarks, or a replica set.

    with start_scorer("models/toy/reward", "models/toy/cost", address_file=tmp / "addr.json") as proc:
        ScorerClient(proc.url).score(prompts, responses)
    procs = start_replicas("models/toy/reward", "models/toy/cost", tmp / "scorers", count=2)

``python -m alignment.scoring.scorer_service --replicas R`` runs :func:`run_replicas`: R services on
this node, one per visible GPU. On a cluster the scorer runs as its own SLURM job instead
(slurm/run_scorer_service.sh), with one replica per task through ``srun``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from alignment import cli
from alignment.scoring.address import default_address_dir, read_address

logger = logging.getLogger(__name__)


class ScorerProcess:
    """A running scorer child process; stops it on ``stop()`` or when leaving a ``with`` block."""

    def __init__(self, popen: subprocess.Popen, url: str, address_file: Path, log_file: Path | None) -> None:
        self.popen, self.url, self.address_file, self.log_file = popen, url, address_file, log_file

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def kill(self) -> None:
        """SIGKILL, as a crashed node would (the address file stays behind)."""
        self.popen.kill()
        self.popen.wait()

    def __enter__(self) -> ScorerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path | None, n: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _published(popen: subprocess.Popen, address_file: Path | None, address_dir: Path | None) -> Path | None:
    """The address file ``popen`` wrote (in ``address_dir``: the one holding its pid), if any yet."""
    if address_file is not None:
        return address_file if address_file.exists() else None
    for path in sorted(address_dir.glob("*.json")) if address_dir and address_dir.is_dir() else []:
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == popen.pid:
                return path
        except (OSError, ValueError, AttributeError):
            continue
    return None


def spawn_scorer(
    reward_model: str | Path,
    cost_model: str | Path,
    address_file: str | Path | None = None,
    extra_args: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    log_file: str | Path | None = None,
    env: dict[str, str] | None = None,
    num_threads: int | None = None,
    module: str = "alignment.scoring.scorer_service",
    address_dir: str | Path | None = None,
) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Launch ``python -m <module>`` (the scorer service) without waiting; see :func:`wait_ready`."""
    if (address_file is None) == (address_dir is None):
        raise ValueError("give either address_file or address_dir")
    where: list[str]
    if address_file is not None:
        Path(address_file).unlink(missing_ok=True)
        where = ["--address-file", str(address_file)]
    else:
        where = ["--address-dir", str(address_dir)]
    cmd = [
        sys.executable, "-m", module,
        "--reward-model", str(reward_model), "--cost-model", str(cost_model),
        "--host", host, "--port", str(port), *where, *extra_args,
    ]  # fmt: skip
    if num_threads:
        cmd += ["--num-threads", str(num_threads)]
    log_path = Path(log_file) if log_file else None
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    child_env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **(env or {})}
    popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env)
    if log_path:
        out.close()
    info = {
        "address_file": Path(address_file) if address_file is not None else None,
        "address_dir": Path(address_dir) if address_dir is not None else None,
        "log_file": log_path,
    }
    return popen, info


def wait_ready(popen: subprocess.Popen, info: dict[str, Any], timeout: float = 120.0) -> ScorerProcess:
    """Wait until the spawned scorer published its address and answers /health; kill it if it
    does not within ``timeout`` seconds."""
    log_path = info["log_file"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(
                f"scorer exited with code {popen.returncode} before it was ready\n{_tail(log_path)}"
            )
        path = _published(popen, info["address_file"], info["address_dir"])
        if path is not None:
            try:
                url = read_address(path).url
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    logger.info("scorer ready at %s", url)
                    return ScorerProcess(popen, url, path, log_path)
            except (ValueError, OSError, httpx.HTTPError):
                pass
        time.sleep(0.2)
    popen.kill()
    popen.wait()
    raise TimeoutError(f"scorer did not become ready within {timeout:.0f}s\n{_tail(log_path)}")


def start_scorer(
    reward_model: str | Path,
    cost_model: str | Path,
    address_file: str | Path | None = None,
    extra_args: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    log_file: str | Path | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    num_threads: int | None = None,
    module: str = "alignment.scoring.scorer_service",
    address_dir: str | Path | None = None,
) -> ScorerProcess:
    """Launch the scorer service and wait for its address and /health."""
    popen, info = spawn_scorer(reward_model, cost_model, address_file, extra_args, host, port, log_file, env,
                               num_threads, module, address_dir)  # fmt: skip
    return wait_ready(popen, info, timeout)


def start_replicas(
    reward_model: str | Path,
    cost_model: str | Path,
    address_dir: str | Path,
    count: int,
    extra_args: Sequence[str] = (),
    log_dir: str | Path | None = None,
    timeout: float = 180.0,
    num_threads: int | None = 1,
    env: dict[str, str] | None = None,
) -> list[ScorerProcess]:
    """``count`` scorers on 127.0.0.1 publishing into ``address_dir``, started together; all are
    stopped again if one fails to start."""
    env = {**(env or {}), **({"OMP_NUM_THREADS": str(num_threads)} if num_threads else {})}
    spawned = [
        spawn_scorer(reward_model, cost_model, None, extra_args, log_file=Path(log_dir) / f"replica-{k}.log"
                     if log_dir else None, env=env, num_threads=num_threads, address_dir=address_dir)
        for k in range(count)
    ]  # fmt: skip
    ready: list[ScorerProcess] = []
    try:
        for popen, info in spawned:
            ready.append(wait_ready(popen, info, timeout))
    except BaseException:
        for popen, _ in spawned:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
        raise
    return ready


def _without_replicas_flag(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--replicas":
            skip = True
        elif not arg.startswith("--replicas="):
            out.append(arg)
    return out


def replica_plan(count: int, device: str, port: int, num_threads: int | None, gpus: int) -> list[list[str]]:
    """The flags that set replica k apart: its device (GPUs dealt round robin), port (``port + k``
    unless 0) and, on CPU, its share of the allotted cores."""
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    plans = []
    for k in range(count):
        flags = ["--port", str(port + k if port else 0)]
        if device == "cuda":
            flags += ["--device", f"cuda:{k % gpus}" if gpus else "cuda"]
        else:
            flags += ["--device", device]
        if device == "cpu" and num_threads is None:
            flags += ["--num-threads", str(max(1, cli.allotted_cpus() // count))]
        plans.append(flags)
    return plans


def run_replicas(argv: Sequence[str], count: int, settings: Any) -> int:
    """``--replicas R``: run R scorer services on this node until SIGTERM/SIGINT, then stop them.

    A replica that exits on its own is reported and the others keep serving (clients fail over);
    the exit code is 1 when one did so, else 0.
    """
    import torch

    gpus = torch.cuda.device_count() if settings.device in ("auto", "cuda") else 0
    if settings.device == "cuda" and not gpus:
        raise cli.UserError("--device cuda: no GPU is visible")
    if gpus and count > gpus:
        logger.warning("%d replicas on %d GPUs: some GPUs serve several replicas", count, gpus)
    address_dir = str(settings.address_dir or default_address_dir())
    base = [*_without_replicas_flag(argv), "--replicas", "1", "--address-dir", address_dir]
    children: list[subprocess.Popen] = []
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for k, flags in enumerate(
        replica_plan(count, settings.device, settings.port, settings.num_threads, gpus)
    ):
        env = dict(os.environ)
        if "--num-threads" in flags:
            env["OMP_NUM_THREADS"] = flags[flags.index("--num-threads") + 1]
        cmd = [sys.executable, "-m", "alignment.scoring.scorer_service", *base, *flags]
        children.append(subprocess.Popen(cmd, env=env))
        logger.info("replica %d (pid %d): %s; address file in %s", k, children[-1].pid, " ".join(flags),
                    address_dir)  # fmt: skip
    failed = False
    running = {child.pid: k for k, child in enumerate(children)}
    while running:
        for child in children:
            if child.pid in running and child.poll() is not None:
                k = running.pop(child.pid)
                if not stopping:
                    failed = True
                    logger.error("replica %d (pid %d) exited with code %s; %d replica(s) keep serving",
                                 k, child.pid, child.returncode, len(running))  # fmt: skip
        time.sleep(0.2)
    return 1 if failed else 0
