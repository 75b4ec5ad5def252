"""Settings of the scorer service and its command line."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from alignment import cli


@dataclass
class ServiceSettings:
    reward_model: str
    cost_model: str
    host: str = "0.0.0.0"
    port: int = 8000
    dtype: str = "auto"
    device: str = "auto"
    max_length: int = 512
    max_batch_size: int = 32
    max_batch_tokens: int | None = None  # 16384 on a GPU, 1024 on CPU
    max_padding: float = 0.25
    max_wait_ms: float = 5.0
    batching: bool = True
    token: str | None = None
    insecure_no_token: bool = False
    address_file: str | None = None
    max_items: int = 4096
    max_text_chars: int = 200_000
    max_body_bytes: int = 64 * 1024 * 1024
    max_queue_items: int = 16384
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive_timeout: float = 30.0
    max_connections: int | None = None
    access_log: bool = False
    num_threads: int | None = None
    tokenizer_threads: int = 2
    address_dir: str | None = None
    replicas: int = 1


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def parse_args(
    argv: list[str] | None = None, prog: str = "scorer_service", description: str | None = None
) -> ServiceSettings:
    p = cli.parser(description, prog=prog)
    p.add_argument("--reward-model", required=True, help="path or hub name of the reward model")
    p.add_argument("--cost-model", required=True, help="path or hub name of the cost model")
    p.add_argument(
        "--host",
        default="0.0.0.0",
        help="interface to listen on (default all; beyond loopback a bearer token is required)",
    )
    p.add_argument(
        "--port", type=int, default=8000, help="0 picks a free port (published in the address file)"
    )
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--max-length",
        type=_positive(int),
        default=512,
        help="tokens per text; longer texts keep their first max_length-1 tokens plus EOS (default 512: "
        "the Beaver models' training length, and what the published study's scores used)",
    )
    p.add_argument("--max-batch-size", type=_positive(int), default=32, help="rows per forward pass")
    p.add_argument(
        "--max-batch-tokens",
        type=_positive(int),
        default=None,
        help="padded tokens (rows x longest row) per forward pass; rows are sorted by length first "
        "(default 16384 on a GPU, 1024 on CPU, where bigger passes are slower per row)",
    )
    p.add_argument(
        "--max-padding",
        type=float,
        default=0.25,
        help="largest share of a forward pass that may be padding (rows of very different length "
        "go to separate passes)",
    )
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        help="score every request as its own batch (for comparison only)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("SCORER_TOKEN") or None,
        help="require 'Authorization: Bearer TOKEN' on every route but /health (default: "
        "$SCORER_TOKEN; when listening beyond loopback without one, a token is generated and "
        "written to the address file)",
    )
    p.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="listen beyond loopback without a token: anyone who reaches the port can score",
    )
    p.add_argument(
        "--address-file",
        default=None,
        help="publish the address and token in this one file, mode 0600 (default $SCORER_ADDRESS_FILE; "
        "unset: a file of its own in the address directory)",
    )
    p.add_argument(
        "--address-dir",
        default=None,
        help="publish into a file of its own (named after host and port) in this directory, where "
        "clients given url=auto find every replica (default $SCORER_ADDRESS_DIR or logs/scorers)",
    )
    p.add_argument(
        "--replicas",
        type=_positive(int),
        default=1,
        help="start this many replicas on this node, one per visible GPU (on CPU each gets its share "
        "of the cores), each on its own port (--port P: P, P+1, ...) and address file in --address-dir; "
        "on several nodes use slurm/run_scorer_service.sh (srun, one replica per task)",
    )
    p.add_argument(
        "--max-items", type=_positive(int), default=4096, help="largest number of texts in one request"
    )
    p.add_argument(
        "--max-text-chars", type=_positive(int), default=200_000, help="longest single text accepted"
    )
    p.add_argument("--max-body-mb", type=_positive(float), default=64.0, help="largest request body")
    p.add_argument(
        "--max-queue-items",
        type=_positive(int),
        default=16384,
        help="texts allowed to wait at once; beyond that requests get 503 with Retry-After",
    )
    p.add_argument(
        "--header-timeout", type=_positive(float), default=10.0, help="seconds for a request's headers"
    )
    p.add_argument("--body-timeout", type=_positive(float), default=60.0, help="seconds for a request's body")
    p.add_argument(
        "--keep-alive-timeout",
        type=_positive(float),
        default=30.0,
        help="seconds an idle keep-alive connection stays open",
    )
    p.add_argument(
        "--max-connections",
        type=_positive(int),
        default=None,
        help="open connections allowed (default: below the file-descriptor limit, at most 1024); "
        "beyond it the longest-idle connection is closed",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default torch's choice); on a CPU host shared with "
        "generation engines give the scorer its own share of cores",
    )
    p.add_argument(
        "--tokenizer-threads",
        type=_positive(int),
        default=2,
        help="threads tokenising requests, in slices that take turns between requests (default 2)",
    )
    a = p.parse_args(argv)
    if not 0.0 <= a.max_padding < 1.0:
        p.error(f"--max-padding must be in [0, 1), got {a.max_padding}")
    if a.token is not None and a.insecure_no_token:
        p.error("--token and --insecure-no-token contradict each other")
    if a.address_file and a.address_dir:
        p.error("--address-file and --address-dir: give one (a directory holds one file per replica)")
    if a.replicas > 1 and a.address_file:
        p.error(
            f"--replicas {a.replicas} needs --address-dir (one address file per replica), not --address-file"
        )
    settings = ServiceSettings(**{k: v for k, v in vars(a).items() if k not in ("max_body_mb", "debug")})
    settings.max_body_bytes = int(a.max_body_mb * 1024 * 1024)
    return settings
