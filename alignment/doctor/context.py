"""What every doctor check is told: the device, the models, where to write, whether to be quick."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Context:
    """The run's settings as each check (a child process) receives them.

    ``policy``/``reward_model``/``cost_model`` are folders once the ``models`` check has built or
    found them; ``*_label`` says what they are (``toy``, ``1b``, ``7b`` or the user's path).
    ``scorer_url``: the scorer the parent keeps running for ES and GRPO (None before it starts).
    """

    device: str  # "cuda" or "cpu"
    quick: bool
    models_dir: str
    out_dir: str
    policy_label: str
    score_label: str
    policy: str | None = None
    reward_model: str | None = None
    cost_model: str | None = None
    scorer_url: str | None = None
    scorer_threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def work_dir(self, check: str) -> Path:
        """A scratch folder of ``check`` inside the run's output folder."""
        path = Path(self.out_dir) / check
        path.mkdir(parents=True, exist_ok=True)
        return path

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Context:
        return cls(**json.loads(path.read_text()))
