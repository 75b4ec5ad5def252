"""A real SLURM cluster of two nodes on this one machine, for the multi-node tests.

Debian's slurm-wlm runs several ``slurmd`` on one host (``slurmd -N <node>``), so a cluster is a
``munged``, a ``slurmctld`` and one ``slurmd`` per node, all in the foreground as children of the
test process, each with its own files in one temporary folder: a fresh munge key and socket, a
``slurm.conf`` with free ports, state, spool and logs. Nothing outside that folder is read or
written (``SLURM_CONF`` points the clients at it), so several clusters can run side by side.

The nodes have distinct loopback addresses (``NodeAddr=127.0.0.11``, ``127.0.0.12``) that no
DNS knows: job scripts must take a node's address from ``scontrol show node`` as on a real
cluster. (Not 127.0.0.1: Ray rewrites exactly that address into the machine's outward one.)
Each node offers 2 CPU slots (CPUS_PER_NODE), and a batch job starts as soon as it is submitted
(``batch_sched_delay=0``; SLURM's default waits for its scheduler's next pass, up to 3 s a job).

    with SlurmCluster.start(tmp_path) as cluster:
        job = cluster.sbatch("slurm/train_persona.sh", "--total_steps", "1", nodes=2, env=env)
        assert cluster.wait(job) == "COMPLETED"
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SBIN = "/usr/sbin"
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
NODE_ADDRS = ("127.0.0.11", "127.0.0.12")
# Each node is this machine, which CI gives 2 cores: 2 CPU slots per node let a job of several tasks
# (the scorer's replicas) and a 1-node trainer job beside it be scheduled as on a real cluster, with no
# --overcommit. The jobs themselves ask for one CPU per task (SlurmCluster.sbatch). The slurm.conf's
# SlurmdParameters=config_overrides keeps a node with fewer cores than that usable (not drained).
CPUS_PER_NODE = 2
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}  # fmt: skip


def missing_reason() -> str | None:
    """Why no cluster can start here (None when one can)."""
    path = os.environ.get("PATH", "") + os.pathsep + SBIN
    absent = [p for p in PROGRAMS if shutil.which(p, path=path) is None]
    if absent:
        return (
            f"SLURM is not installed ({', '.join(absent)} missing; `make test` installs slurm-wlm and munge)"
        )
    if os.geteuid() != 0:
        return "the test cluster's slurmd must run as root to launch jobs (CI runs as root)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: Path, ctld_port: int, node_ports: list[int]) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(
        f"NodeName=n{i + 1} NodeHostname={host} NodeAddr={NODE_ADDRS[i]} CPUs={CPUS_PER_NODE} RealMemory=4000 Port={port}"
        for i, port in enumerate(node_ports)
    )
    return f"""\
ClusterName=alignment-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
KillWait=10
{nodes}
PartitionName=debug Nodes=n[1-{len(node_ports)}] Default=YES State=UP MaxTime=INFINITE
"""


@dataclass
class SlurmCluster:
    """The running cluster: its folder, the environment its clients need, its daemons."""

    root: Path
    env: dict[str, str]
    nodes: dict[str, str]  # name -> NodeAddr
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    @contextmanager
    def start(cls, root: Path, num_nodes: int = 2, timeout: float = 60) -> Iterator[SlurmCluster]:
        """Start munged, slurmctld and ``num_nodes`` slurmd; everything is stopped on exit, also when
        starting fails half-way."""
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("munge", "state", "log", *(f"spool/n{i + 1}" for i in range(num_nodes))):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (root / "munge").chmod(0o755)  # clients must reach the socket
        conf = root / "slurm.conf"
        conf.write_text(_conf(root, free_port(), [free_port() for _ in range(num_nodes)]))
        env = {**os.environ, "SLURM_CONF": str(conf), "PATH": os.environ.get("PATH", "") + os.pathsep + SBIN}
        cluster = cls(root, env, {f"n{i + 1}": NODE_ADDRS[i] for i in range(num_nodes)})
        try:
            m = root / "munge"
            cluster._daemon(["munged", "--foreground", "--force", f"--socket={m}/socket", f"--key-file={key}",
                             f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/seed"],
                            "munged")  # fmt: skip
            cluster._wait_for(lambda: (m / "socket").exists(), 10, "munged's socket")
            cluster._daemon(["slurmctld", "-D"], "slurmctld")
            cluster._wait_for(lambda: cluster._run(["scontrol", "ping"], check=False).returncode == 0, timeout,
                              "slurmctld to answer")  # fmt: skip
            for name in cluster.nodes:
                cluster._daemon(["slurmd", "-D", "-N", name], f"slurmd-{name}")
            cluster._wait_for(cluster._all_idle, timeout, "every node to be idle")
            yield cluster
        finally:
            cluster.stop()

    # -- daemons ---------------------------------------------------------------------------
    def _daemon(self, cmd: list[str], name: str) -> None:
        with open(self.root / "log" / f"{name}.stdout", "wb") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.root)
        self.daemons.append(proc)
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at once ({proc.returncode}); see {self.root / 'log'}")

    def _run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-1500:] for p in sorted((self.root / "log").glob("*")))
                raise RuntimeError(f"SLURM test cluster: waited for {what}; dead: {dead}\n{logs}")
            time.sleep(0.3)

    def _all_idle(self) -> bool:
        out = self._run(["sinfo", "-N", "-h", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=False))
        return all(states.get(n) == "idle" for n in self.nodes)

    def stop(self) -> None:
        """Cancel every job, wait for them to end (their processes are children of the slurmd being
        stopped), then stop the daemons by pid: SIGTERM, then SIGKILL after 15 s."""
        if any(p.poll() is None for p in self.daemons if p.args[0] == "slurmctld"):
            self._run(["scancel", "--full", "--user", str(os.geteuid())], check=False)
            deadline = time.monotonic() + 30
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        # a finished job's slurmstepd lingers a moment; its slurmd must still be there to reap it
        deadline = time.monotonic() + 15
        while self._steps() and time.monotonic() < deadline:
            time.sleep(0.3)
        for proc in reversed(self.daemons):  # slurmd first, munged last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.daemons = []

    def _steps(self) -> list[psutil.Process]:
        """Live slurmstepd processes under this cluster's slurmd."""
        steps = []
        for proc in self.daemons:
            if proc.args[0] == "slurmd" and proc.poll() is None:
                try:
                    steps += [c for c in psutil.Process(proc.pid).children(recursive=True)
                              if c.status() != psutil.STATUS_ZOMBIE]  # fmt: skip
                except psutil.Error:
                    continue
        return steps

    # -- jobs ------------------------------------------------------------------------------
    def sbatch(self, script: str | Path, *args: str, nodes: int, env: Mapping[str, str], cwd: Path,
               output: Path, ntasks: int | None = None, extra: tuple[str, ...] = ()) -> int:  # fmt: skip
        """Submit ``script`` from ``cwd`` (the job's SLURM_SUBMIT_DIR) with ``env`` exported (plus
        this cluster's SLURM_CONF); resource requests fit the test nodes whatever the header asks
        (one CPU per task, one task per node or ``ntasks`` spread over the nodes, no GPUs; ``extra``
        flags come after these, so they win). Returns the job id."""
        tasks = f"--ntasks={ntasks}" if ntasks else "--ntasks-per-node=1"
        cmd = ["sbatch", "--parsable", f"--nodes={nodes}", tasks, "--cpus-per-task=1", "--mem=500M",
               "--gres=none", "--time=20", f"--output={output}", *extra, str(script), *args]  # fmt: skip
        job_env = {**env, "SLURM_CONF": self.env["SLURM_CONF"], "PATH": self.env["PATH"]}
        proc = subprocess.run(cmd, env=job_env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, ExitCode, NodeList, ...)."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def state(self, job_id: int) -> str:
        return self.job(job_id)["JobState"]

    def jobs(self) -> list[str]:
        return self._run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()

    def wait(self, job_id: int, timeout: float = 600, until: frozenset[str] | set[str] = FINISHED) -> str:
        """Wait until the job's state is in ``until`` (default: finished); returns the state."""
        deadline = time.monotonic() + timeout
        while (state := self.state(job_id)) not in until:
            if time.monotonic() > deadline:
                self._run(["scancel", str(job_id)], check=False)
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s (cancelled)")
            time.sleep(0.2)
        return state

    def scancel(self, job_id: int) -> None:
        self._run(["scancel", str(job_id)])


# -- what a job leaves behind ---------------------------------------------------------------------
def job_processes(marker: str) -> list[str]:
    """Live processes started by a job submitted with ``ALIGNMENT_TEST_JOB=marker`` in its environment,
    which every process of the job inherits: the script, srun tasks, `ray start`, raylets, GCS, the
    actors (whose command line Ray rewrites to ``ray::EngineActor``), trainers, torchrun ranks."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if (
                proc.info["status"] != psutil.STATUS_ZOMBIE
                and proc.environ().get("ALIGNMENT_TEST_JOB") == marker
            ):
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:160]}")
        except psutil.Error:
            continue
    return found


def assert_nothing_left(env: Mapping[str, str], timeout: float = 30) -> None:
    """Fails naming every process of the job (``env``'s marker) still alive after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (left := job_processes(env["ALIGNMENT_TEST_JOB"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "processes outlived the job:\n" + "\n".join(left)
