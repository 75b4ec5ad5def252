"""Start a scorer service as a child process and wait until it answers (demo, tests, benchmarks).

    with start_scorer("models/toy/reward", "models/toy/cost", address_file=tmp / "addr.json") as proc:
        ScorerClient(proc.url).score(prompts, responses)

On a cluster the scorer runs as its own SLURM job instead (slurm/run_scorer_service.sh).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from alignment.scoring.address import read_address_file

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


def start_scorer(
    reward_model: str | Path,
    cost_model: str | Path,
    address_file: str | Path,
    extra_args: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    log_file: str | Path | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    num_threads: int | None = None,
    module: str = "alignment.scoring.scorer_service",
) -> ScorerProcess:
    """Launch ``python -m <module>`` (the scorer service) and wait for its address and /health."""
    address_file = Path(address_file)
    address_file.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", module,
        "--reward-model", str(reward_model), "--cost-model", str(cost_model),
        "--host", host, "--port", str(port), "--address-file", str(address_file), *extra_args,
    ]  # fmt: skip
    if num_threads:
        cmd += ["--num-threads", str(num_threads)]
    log_path = Path(log_file) if log_file else None
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    child_env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **(env or {})}
    popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env)
    if log_path:
        out.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(
                f"scorer exited with code {popen.returncode} before it was ready\n{_tail(log_path)}"
            )
        if address_file.exists():
            try:
                url = read_address_file(address_file)
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    logger.info("scorer ready at %s", url)
                    return ScorerProcess(popen, url, address_file, log_path)
            except (ValueError, OSError, httpx.HTTPError):
                pass
        time.sleep(0.2)
    popen.kill()
    raise TimeoutError(f"scorer did not become ready within {timeout:.0f}s\n{_tail(log_path)}")
