"""What every figure script shares: Agg figures, atomic PNG saving, colours and CLI path helpers.

Figures are built as :class:`matplotlib.figure.Figure` objects bound to the Agg canvas rather than
through ``pyplot``: nothing global changes (a notebook keeps its own backend), no display is needed,
and a figure that is dropped is freed without ``plt.close``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alignment.cli import InputError

logger = logging.getLogger(__name__)

DPI = 150
# Safe quadrants in greens, unsafe in warm colours, helpful darker: the same hue family reads as safety.
QUADRANT_COLORS = {"SH": "#2e8b57", "SU": "#9fd5a8", "UH": "#f4a259", "UU": "#d1495b"}
QUADRANT_NAMES = {"SH": "safe & helpful", "SU": "safe & unhelpful", "UH": "unsafe & helpful",
                  "UU": "unsafe & unhelpful"}  # fmt: skip


def new_figure(figsize: tuple[float, float]) -> Figure:
    """An empty figure on the Agg canvas, independent of pyplot's current backend."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def series_color(index: int) -> Any:
    """The ``index``-th colour of matplotlib's tab10 cycle (wraps around), as the study's figures use."""
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG at ``path`` via a temporary file and a rename (never half a PNG at ``path``).

    The parent folder is created if needed. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s", path)
    return path


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or a FileNotFoundError naming ``what`` the folder should have held."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such {what} folder: {path}")
    return path


def choose_models(available: Sequence[str], wanted: Sequence[str] | None, where: str | Path) -> list[str]:
    """``wanted`` in its order (all of ``available`` when None); unknown names or none at all are errors."""
    if not available:
        raise InputError(f"no models in {where}")
    if not wanted:
        return list(available)
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise InputError(f"model(s) {unknown} not in {where}; available: {list(available)}")
    return list(wanted)
