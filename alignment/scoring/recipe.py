"""The scorer keys of a training recipe (ES flags, GRPO YAML): one set, one client built from them.

ES and GRPO configs inherit these fields, so both trainers find replicas, retry and give up the same
way; ``scorer_url: auto`` (the default) uses every healthy replica in the address sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignment.config import field_help as _help
from alignment.scoring.client import DEFAULT_RETRY_BUDGET, ScorerClient


@dataclass
class ScorerRecipe:
    scorer_url: str = field(
        default="auto",
        metadata=_help("scorer URL(s), comma-separated, or auto: every healthy replica in the address files"),
    )
    scorer_address_file: str | None = field(
        default=None, metadata=_help("address file (or directory) to read with auto")
    )
    scorer_address_dir: str | None = field(
        default=None,
        metadata=_help("directory of replica address files for auto (default $SCORER_ADDRESS_DIR or "
                       "logs/scorers, plus logs/scorer_address.json)"),
    )  # fmt: skip
    scorer_batch_size: int = field(default=64, metadata=_help("pairs per scorer request"))
    scorer_timeout: float = field(default=300.0, metadata=_help("seconds for one scorer request"))
    scorer_retry_budget_s: float = field(
        default=DEFAULT_RETRY_BUDGET,
        metadata=_help("seconds of scorer outage (no replica answers) before the run stops, resumable"),
    )
    scorer_retries: int | None = field(
        default=None,
        metadata=_help("also stop after this many waits of one request (default: the budget only)"),
    )

    def scorer_client(self) -> ScorerClient:
        """The client these keys describe."""
        return ScorerClient(
            self.scorer_url,
            address_file=self.scorer_address_file,
            address_dir=self.scorer_address_dir,
            batch_size=self.scorer_batch_size,
            timeout=self.scorer_timeout,
            retries=self.scorer_retries,
            retry_budget=self.scorer_retry_budget_s,
        )
