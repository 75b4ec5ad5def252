"""Wait until every node of a multi-node job has joined the job's Ray cluster.

    python -m alignment.es.ray_cluster --address 10.0.0.1:6379 \\
        --node gpu001=10.0.0.1 --node gpu002=10.0.0.2 --timeout 300 --watch-pid 4242

``slurm/ray_cluster.sh`` starts the head on the job's first node and one ``ray start --block`` per
other node through ``srun``, then calls this before the trainer starts. It prints one line per
node (name, address, CPUs, GPUs) once all are alive. If a node is still missing after
``--timeout`` seconds, or a watched process (the head, the workers' ``srun``) exits first, it
fails with one line naming the missing nodes (exit code 2), and the job script tears the cluster
down. Nodes are matched by address: each node's raylet was started with ``--node-ip-address``
set to its SLURM ``NodeAddr``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from alignment import cli

logger = logging.getLogger(__name__)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def missing_nodes(ray_nodes: list[dict[str, Any]], expected: dict[str, str]) -> dict[str, str]:
    """The ``expected`` nodes (name -> address) with no live Ray node at their address."""
    live = {n.get("NodeManagerAddress") for n in ray_nodes if n.get("Alive")}
    return {name: addr for name, addr in expected.items() if addr not in live}


def describe(missing: dict[str, str]) -> str:
    return ", ".join(f"{name} ({addr})" for name, addr in missing.items())


def wait_for_nodes(
    address: str,
    expected: dict[str, str],
    timeout: float,
    watch_pids: tuple[int, ...] = (),
    poll: float = 1.0,
) -> list[dict[str, Any]]:
    """Connect to the Ray cluster at ``address`` and wait until every ``expected`` node (name ->
    address) is alive; returns Ray's records of those nodes. Raises :class:`cli.UserError` naming
    the missing nodes on timeout or when a process in ``watch_pids`` has exited."""
    import ray

    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as exc:  # the head never came up
        raise cli.UserError(f"no Ray head answers at {address} ({exc}); see the job's ray head log") from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            nodes = ray.nodes()
            missing = missing_nodes(nodes, expected)
            if not missing:
                wanted = set(expected.values())
                return [n for n in nodes if n.get("Alive") and n.get("NodeManagerAddress") in wanted]
            gone = [pid for pid in watch_pids if not alive(pid)]
            if gone:
                raise cli.UserError(
                    f"Ray cluster at {address}: node(s) {describe(missing)} never joined: the process "
                    f"starting them (pid {', '.join(map(str, gone))}) exited; see the job's ray logs"
                )
            if time.monotonic() > deadline:
                raise cli.UserError(
                    f"Ray cluster at {address}: node(s) {describe(missing)} did not join within "
                    f"{timeout:g} s (RAY_JOIN_TIMEOUT_S); see the job's ray logs"
                )
            time.sleep(poll)
    finally:
        ray.shutdown()


def parse_node(text: str) -> tuple[str, str]:
    name, sep, addr = text.partition("=")
    if not sep or not name or not addr:
        raise cli.UserError(f"--node wants NAME=ADDRESS, got {text!r}")
    return name, addr


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--address", required=True, help="the head's HOST:PORT")
    p.add_argument("--node", action="append", required=True, help="NAME=ADDRESS of a node that must join")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every node")
    p.add_argument("--watch-pid", type=int, action="append", default=[], help="fail early once this exits")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    expected = dict(parse_node(n) for n in a.node)
    nodes = wait_for_nodes(a.address, expected, a.timeout, tuple(a.watch_pid))
    names = {addr: name for name, addr in expected.items()}
    for n in sorted(nodes, key=lambda n: n["NodeManagerAddress"]):
        res = n.get("Resources", {})
        print(f"{names[n['NodeManagerAddress']]} {n['NodeManagerAddress']} CPU={res.get('CPU', 0):g} "
              f"GPU={res.get('GPU', 0):g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.run(main)
