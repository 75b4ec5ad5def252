"""pyproject.toml's lower bounds, constraints-lowest.txt and requirements.txt stay in step.

``make test-lowest`` proves the bounds true by installing constraints-lowest.txt; that only means
something while the file pins exactly the declared bounds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest brings tomli on 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def declared_requirements(pyproject: Path) -> list[Requirement]:
    """Every requirement of ``[project]``: dependencies and all optional extras."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    return [Requirement(s) for s in specs]


def lower_bounds(requirements: list[Requirement]) -> dict[str, Version]:
    """name -> the version of its ``>=`` bound; a missing or conflicting bound is an error."""
    bounds: dict[str, Version] = {}
    for req in requirements:
        name = canonicalize_name(req.name)
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if len(lows) != 1:
            raise ValueError(f"pyproject.toml: {req} needs exactly one '>=' lower bound")
        if name in bounds and bounds[name] != lows[0]:
            raise ValueError(f"pyproject.toml: {req.name} has two lower bounds ({bounds[name]}, {lows[0]})")
        bounds[name] = lows[0]
    return bounds


def pins(path: Path) -> dict[str, Version]:
    """name -> version of each ``name==version`` line (comments, blank and unpinned lines skipped)."""
    out: dict[str, Version] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if len(exact) == 1:
            name = canonicalize_name(req.name)
            if name in out:
                raise ValueError(f"{path.name}:{lineno}: {req.name} pinned twice")
            out[name] = Version(exact[0])
    return out


def test_constraints_lowest_pins_exactly_the_declared_lower_bounds() -> None:
    bounds = lower_bounds(declared_requirements(REPO / "pyproject.toml"))
    lowest = pins(REPO / "constraints-lowest.txt")
    missing = sorted(set(bounds) - set(lowest))
    extra = sorted(set(lowest) - set(bounds))
    differ = {
        n: (str(bounds[n]), str(lowest[n])) for n in set(bounds) & set(lowest) if bounds[n] != lowest[n]
    }
    assert not missing, f"declared in pyproject.toml but not pinned in constraints-lowest.txt: {missing}"
    assert not extra, f"pinned in constraints-lowest.txt but not declared in pyproject.toml: {extra}"
    assert not differ, f"pyproject.toml bound vs constraints-lowest.txt pin: {differ}"


def test_tested_versions_lie_inside_the_declared_ranges() -> None:
    declared = {
        canonicalize_name(r.name): r.specifier for r in declared_requirements(REPO / "pyproject.toml")
    }
    tested = pins(REPO / "requirements.txt")
    outside = {
        n: (str(v), str(declared[n])) for n, v in tested.items() if n in declared and v not in declared[n]
    }
    assert not outside, f"requirements.txt pins outside pyproject.toml's ranges: {outside}"


def test_drift_is_caught(tmp_path: Path) -> None:
    # The checks above could pass vacuously if parsing found nothing: show they see a real bound.
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["tenacity>=8.2"]\n[project.optional-dependencies]\n'
                         'dev = ["pytest>=8"]\n')  # fmt: skip
    constraints = tmp_path / "c.txt"
    constraints.write_text("tenacity==9.2.1  # comment\npytest==8.0.0\n")
    bounds, lowest = lower_bounds(declared_requirements(pyproject)), pins(constraints)
    assert bounds == {"tenacity": Version("8.2"), "pytest": Version("8")}
    assert bounds["pytest"] == lowest["pytest"] and bounds["tenacity"] != lowest["tenacity"]
    pyproject.write_text('[project]\ndependencies = ["tenacity"]\n')
    with pytest.raises(ValueError, match="tenacity needs exactly one '>=' lower bound"):
        lower_bounds(declared_requirements(pyproject))
