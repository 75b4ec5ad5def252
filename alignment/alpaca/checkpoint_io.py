"""Tensor-by-tensor access to Hugging Face checkpoints, so a 7B model never has to sit in memory twice.

Reads the four layouts ``save_pretrained`` writes (``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, ``pytorch_model.bin``, sharded ``.bin`` with
``pytorch_model.bin.index.json``) lazily: safetensors through ``safe_open``, ``.bin`` through
``torch.load(mmap=True, weights_only=True)``, so only the tensors in use are paged in. Writes
safetensors shards as they fill, with a ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alignment import hub

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_dir(path_or_name: str, given_by: str = "the model name") -> Path:
    """A local folder as is; otherwise a hub repository id fetched with ``snapshot_download``.

    Weights, configs and tokenizer files only. With ``HF_HUB_OFFLINE=1`` only the local cache is
    searched. A name that is neither raises :class:`alignment.hub.HubError` (a ``UserError``) naming
    the input and ``given_by`` (the flag that names a local folder instead).
    """
    local = Path(path_or_name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(
            f"{path_or_name} ({given_by}) is a file; a model folder (config.json + weights) is needed"
        )
    if not _HUB_NAME.match(path_or_name):
        raise hub.HubError(f"no such model folder: {path_or_name} ({given_by})")
    from huggingface_hub import snapshot_download

    logger.info("%s is not a local folder: fetching it from the Hugging Face hub", path_or_name)
    with hub.loading(path_or_name, given_by):
        return Path(snapshot_download(repo_id=path_or_name, allow_patterns=HUB_PATTERNS))


def _weight_map(folder: Path) -> dict[str, str]:
    """``tensor name -> file name`` for the checkpoint in ``folder`` (safetensors preferred)."""
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{index}: not a checkpoint index with a 'weight_map': {exc}") from exc
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{index} names shard(s) that are missing: {missing}")
            return dict(weight_map)
        if (folder / single).is_file():
            return {key: single for key in _file_keys(folder / single)}
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"{folder}: no weights ({SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX} or {BIN_SINGLE}); "
        f"found {found}"
    )


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as exc:
        # Files from before torch's zip format cannot be mapped; reading one shard whole still fits.
        logger.warning("%s cannot be memory-mapped (%s); reading it whole", path, exc)
        return torch.load(path, map_location="cpu", weights_only=True)


def _file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as fh:
            return list(fh.keys())
    return list(_load_bin(path))


class CheckpointReader:
    """Lazy reader of one checkpoint folder: names, shapes and one tensor at a time.

    Memory-mapped ``.bin`` shards stay open (file-backed pages, which the OS can drop) until
    :meth:`close`; safetensors files are opened per access.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.weight_map = _weight_map(self.folder)
        self._bin_cache: dict[str, dict[str, torch.Tensor]] = {}

    def files(self) -> list[str]:
        """Shard file names in index order (each once)."""
        return list(dict.fromkeys(self.weight_map.values()))

    def keys_in(self, file_name: str) -> list[str]:
        """Tensor names stored in ``file_name``, in the index's order."""
        return [key for key, name in self.weight_map.items() if name == file_name]

    def _bin(self, file_name: str) -> dict[str, torch.Tensor]:
        if file_name not in self._bin_cache:
            self._bin_cache[file_name] = _load_bin(self.folder / file_name)
        return self._bin_cache[file_name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``name -> shape`` of every tensor, read from headers (safetensors) or mapped files."""
        out: dict[str, tuple[int, ...]] = {}
        for file_name in self.files():
            path = self.folder / file_name
            wanted = self.keys_in(file_name)
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt") as fh:
                    present = set(fh.keys())
                    self._check_present(file_name, wanted, present)
                    out.update({key: tuple(fh.get_slice(key).get_shape()) for key in wanted})
            else:
                tensors = self._bin(file_name)
                self._check_present(file_name, wanted, set(tensors))
                out.update({key: tuple(tensors[key].shape) for key in wanted})
        return out

    def _check_present(self, file_name: str, wanted: list[str], present: set[str]) -> None:
        missing = [key for key in wanted if key not in present]
        if missing:
            raise KeyError(f"{self.folder / file_name} lacks tensor(s) its index names: {missing[:10]}")

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as stored (its own dtype, on the CPU)."""
        if key not in self.weight_map:
            raise KeyError(f"{self.folder}: no tensor named {key!r}")
        file_name = self.weight_map[key]
        if file_name.endswith(".safetensors"):
            with safe_open(self.folder / file_name, framework="pt") as fh:
                return fh.get_tensor(key)
        return self._bin(file_name)[key]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every ``(name, tensor)``, shard by shard, releasing each mapped shard once it is done."""
        for file_name in self.files():
            for key in self.keys_in(file_name):
                yield key, self.tensor(key)
            self._bin_cache.pop(file_name, None)

    def close(self) -> None:
        self._bin_cache.clear()


class ShardedSafetensorsWriter:
    """Writes tensors into safetensors shards of about ``max_shard_bytes`` as they arrive.

    Shards are written under temporary names and renamed to ``model-0000i-of-0000N.safetensors``
    by :meth:`finish`, which also writes ``model.safetensors.index.json``. A tensor larger than the
    limit gets a shard of its own. Memory held: at most one shard's worth of tensors.
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, give the shards their final names and write the index; returns the shard names."""
        if self._pending:
            self._flush()
        if not self._shards:
            raise ValueError("no tensors were written")
        count = len(self._shards)
        names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map: dict[str, str] = {}
        for i, (keys, name) in enumerate(zip(self._shards, names, strict=True)):
            os.replace(self.folder / f".shard-{i:05d}.safetensors", self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names
