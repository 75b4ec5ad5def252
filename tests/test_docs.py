"""Docs that cannot rot: the MkDocs site builds in strict mode, every page is in the nav, every
relative link resolves, and the shell blocks marked ``<!-- runnable -->`` run and succeed.

A runnable block (the convention is described in docs/development.md) runs with ``bash -euo
pipefail`` in a scratch copy of the repository's tracked files, with ``python`` the test's own
interpreter, ``HF_HUB_OFFLINE=1``, the tiny test models at ``models/toy`` and the shared reference
data at ``../shared/reference`` (blocks that ``needs=reference`` are skipped when it is absent).
Blocks of one page run in order in one copy, so a block may use what an earlier one wrote.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SHARED_REFERENCE

DOCS = REPO / "docs"
PAGES = sorted([REPO / "README.md", *DOCS.glob("*.md")])
MARKER = re.compile(r"<!--\s*runnable\b(?P<attrs>[^>]*?)-->")
BLOCK = re.compile(
    r"<!--\s*runnable\b(?P<attrs>[^>]*?)-->[ \t]*\n```(?:bash|sh)[ \t]*\n(?P<body>.*?)\n```", re.S
)
NEEDS = {"reference", "scorer"}
DEFAULT_TIMEOUT = 60


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    body: str
    timeout: int
    needs: frozenset[str]

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def parse_attrs(text: str, where: str) -> tuple[int, frozenset[str]]:
    timeout, needs = DEFAULT_TIMEOUT, frozenset()
    for item in shlex.split(text):
        key, _, value = item.partition("=")
        if key == "timeout" and value.isdigit():
            timeout = int(value)
        elif key == "needs" and set(value.split(",")) <= NEEDS:
            needs = frozenset(value.split(","))
        else:
            raise ValueError(
                f"{where}: unknown runnable attribute {item!r} (timeout=SECONDS, needs={sorted(NEEDS)})"
            )
    return timeout, needs


def runnable_blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    blocks = []
    for m in BLOCK.finditer(text):
        where = f"{page.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}"
        timeout, needs = parse_attrs(m["attrs"], where)
        blocks.append(Block(page, text.count("\n", 0, m.start()) + 1, m["body"], timeout, needs))
    return blocks


BLOCKS = [b for page in PAGES for b in runnable_blocks(page)]


def test_every_marker_is_followed_by_a_shell_block():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        markers = len(MARKER.findall(text))
        assert markers == len(BLOCK.findall(text)), (
            f"{page.name}: a <!-- runnable --> marker must stand on the line right before a ```bash block"
        )
    assert len(BLOCKS) >= 5  # the mechanism is in use


def test_site_builds_strictly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    home = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert 'href="es/"' in home  # README's docs/es.md link, made relative by scripts/mkdocs_hooks.py


def test_a_broken_readme_link_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(DOCS, copy / "docs")
    for name in ("mkdocs.yml", "scripts/mkdocs_hooks.py"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, copy / name)
    (copy / "README.md").write_text((REPO / "README.md").read_text() + "\nSee [gone](docs/gone.md).\n")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=copy, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "gone.md" in proc.stderr


def test_nav_lists_every_page():
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    listed = {next(iter(item.values())) for item in nav}
    assert listed == {"index.md", *(p.name for p in DOCS.glob("*.md"))}


def test_relative_links_resolve():
    """As on the repository's web page: every relative link of README.md and docs/ names a file."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.name}: {target}")
    assert not broken


@pytest.fixture(scope="module")
def scratch() -> dict[Path, Path]:
    """One scratch copy of the tracked tree per page (created on first use)."""
    return {}


def _copy_repo(dest: Path, toy_models: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    repo = dest / "repo"
    for name in files.decode().split("\0"):
        if name and (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    (repo / "models" / "toy").symlink_to(toy_models, target_is_directory=True)
    if SHARED_REFERENCE.is_dir():
        (dest / "shared").mkdir()
        (dest / "shared" / "reference").symlink_to(SHARED_REFERENCE, target_is_directory=True)
    return repo


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_runnable_block(block, scratch, tmp_path_factory, toy_models, request):
    if "reference" in block.needs and not SHARED_REFERENCE.is_dir():
        pytest.skip(f"needs the shared reference data ({SHARED_REFERENCE} is absent)")
    if block.page not in scratch:
        scratch[block.page] = _copy_repo(tmp_path_factory.mktemp(block.page.stem), toy_models)
    repo = scratch[block.page]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    env.pop("SCORER_URL", None)
    if "scorer" in block.needs:
        env["SCORER_URL"] = request.getfixturevalue("scorer").url  # as if started per docs/scorer.md
    # a session of its own, so that a block past its time is stopped with everything it started
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.body], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=block.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"{block.id} ran past its {block.timeout} s (timeout=SECONDS raises it):\n{err[-3000:]}")
    assert proc.returncode == 0, f"{block.id} failed ({proc.returncode}):\n{block.body}\n{err[-3000:]}"


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, module, --flags) of every ``python -m alignment...`` / ``python alignment/....py`` command in
    the shell blocks of README.md and docs/, marked runnable or not (continuation lines joined)."""
    out = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                for part in re.split(r"&&|\|\||;|\|", line.split(" #")[0]):
                    m = re.search(r"python3? (?:-m (alignment\S*)|(alignment/\S+)\.py)(.*)", part)
                    if m:
                        module = m[1] or m[2].replace("/", ".")
                        out.append((page.name, module, re.findall(r"(?<!\S)(--[\w-]+)", m[3])))
    return out


def test_documented_flags_exist(monkeypatch, capsys):
    """Commands with placeholders cannot run, but their flags can be checked: each must appear in
    its CLI's --help (GRPO also takes any GRPOConfig field as --key)."""
    from alignment.grpo.config import grpo_config_fields
    from tests.test_cli import run_module

    known: dict[str, set[str]] = {}
    unknown = []
    for page, module, flags in documented_commands():
        if module not in known:
            capsys.readouterr()
            assert run_module(module, ["--help"], monkeypatch) == 0, module
            known[module] = set(re.findall(r"--[\w-]+", capsys.readouterr().out))
            if module == "alignment.grpo.train_grpo_alignment":
                known[module] |= {f"--{name}" for name in grpo_config_fields()}
        unknown += [f"{page}: {module} {flag}" for flag in flags if flag not in known[module]]
    assert len(known) >= 10 and not unknown
