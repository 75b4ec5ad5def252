"""Run each doctor check in a process of its own, under its own time limit.

A check that hangs, crashes or overruns cannot hide the others: the parent starts
``python -m alignment.doctor.runner CHECK CONTEXT.json RESULT.json`` in a new session, waits at
most the check's limit, then stops the whole process group (the check and anything it started,
e.g. a scorer), and reports ``timed out``. A fresh process per check also means each one's GPU
memory peak is its own, and ``--device cpu`` hides the GPUs from every check
(``CUDA_VISIBLE_DEVICES=""``). The child's log (stdout and stderr) is ``<out>/<check>.log``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

from alignment.doctor.checks import CHECKS, CheckSpec
from alignment.doctor.context import Context
from alignment.doctor.report import CheckResult

logger = logging.getLogger(__name__)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _stop_group(popen: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the check's process group (the check and what it started), SIGKILL to what is
    still there after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            popen.poll()  # reap the check itself, or it stays in the group as a zombie
            try:
                os.killpg(popen.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def child_env(spec: CheckSpec, ctx: Context, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of a check's process: no GPU with ``--device cpu``; the first of the job's GPUs
    for a check that must see one; vLLM's engine in-process (its memory is the check's to measure)."""
    env = dict(base)
    if not ctx.on_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif spec.one_gpu:
        env["CUDA_VISIBLE_DEVICES"] = (env.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


def run_check(name: str, ctx: Context, limit_s: float) -> CheckResult:
    """Run ``name`` in a child process for at most ``limit_s`` seconds; its result, or why there is none."""
    spec = CHECKS[name]
    out = Path(ctx.out_dir)
    ctx_file, result_file, log_file = (
        out / f"{name}.context.json",
        out / f"{name}.result.json",
        out / f"{name}.log",
    )
    result_file.unlink(missing_ok=True)
    ctx.dump(ctx_file)
    env = child_env(spec, ctx, os.environ)
    cmd = [sys.executable, "-m", "alignment.doctor.runner", name, str(ctx_file), str(result_file)]
    t0 = time.perf_counter()
    with open(log_file, "wb") as log:
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = popen.wait(limit_s)
        except BaseException as exc:  # over the limit, or interrupted: stop the check and what it started
            _stop_group(popen)
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            reason = f"stopped after its limit of {limit_s:g} s (--limit {name}=SECONDS); log: {log_file}"
            return CheckResult(name, spec.title, "timed out", time.perf_counter() - t0, limit_s, reason,
                               data={"pid": popen.pid})  # fmt: skip
        _stop_group(popen)  # anything the check left behind
    seconds = time.perf_counter() - t0
    if result_file.is_file():
        import json

        result = CheckResult.from_dict(json.loads(result_file.read_text()))
        result.seconds, result.limit_s = seconds, limit_s
        return result
    return CheckResult(name, spec.title, "failed", seconds, limit_s,
                       f"the check's process exited with code {code} without a result; log {log_file}: "
                       f"{_tail(log_file)}")  # fmt: skip


def child(name: str, ctx_file: Path, result_file: Path) -> int:
    """In the check's process: run it, write its :class:`CheckResult` (an exception is ``failed``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from alignment.atomic import write_text
    from alignment.cli import configure_threads

    configure_threads()
    ctx = Context.load(ctx_file)
    spec = CHECKS[name]
    t0 = time.perf_counter()
    try:
        result = spec.run(ctx)
    except Exception as exc:  # noqa: BLE001 - the report names it; the other checks still run
        traceback.print_exc()
        result = CheckResult(name, spec.title, "failed", reason=f"{type(exc).__name__}: {exc}"[:2000])
    result.seconds = time.perf_counter() - t0
    import dataclasses
    import json

    write_text(result_file, json.dumps(dataclasses.asdict(result), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(child(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
