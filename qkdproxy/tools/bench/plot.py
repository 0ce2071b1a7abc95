"""``--plot FILE.png``: grouped bar charts of benchmark results (matplotlib, optional).

matplotlib is the ``plot`` extra; it is imported only when a plot is asked for, and its
absence is reported as a clear error rather than a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed."""


@dataclass(frozen=True, slots=True)
class BarChart:
    """One panel: a bar per series within each category (None: no bar)."""

    title: str
    ylabel: str
    categories: Sequence[str]
    series: Mapping[str, Sequence[float | None]]
    log_scale: bool = False
    errors: Mapping[str, Sequence[float | None]] = field(default_factory=dict)


def require_matplotlib() -> None:
    """Raise :class:`PlotUnavailableError` now rather than after a long run."""
    try:
        import matplotlib  # noqa: F401, PLC0415 - optional, and slow to import
    except ImportError:
        raise PlotUnavailableError(
            "--plot needs matplotlib: pip install 'qkdproxy[plot]'"
        ) from None


def save(panels: Sequence[BarChart], path: Path) -> None:
    """Draw ``panels`` one above the other into a PNG at ``path``."""
    require_matplotlib()
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415

    figure, axes = pyplot.subplots(
        len(panels), 1, figsize=(max(8.0, 1.2 * _widest(panels)), 4.2 * len(panels)),
        squeeze=False,
    )  # fmt: skip
    for axis, panel in zip(axes[:, 0], panels, strict=True):
        _draw(axis, panel)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _widest(panels: Sequence[BarChart]) -> int:
    return max((len(p.categories) for p in panels), default=1)


def _draw(axis: Axes, panel: BarChart) -> None:
    width = 0.8 / max(1, len(panel.series))
    for index, (name, values) in enumerate(panel.series.items()):
        positions = [c + (index - (len(panel.series) - 1) / 2) * width
                     for c in range(len(panel.categories))]  # fmt: skip
        heights = [math.nan if v is None else v for v in values]
        errors = panel.errors.get(name)
        yerr = None if errors is None else [0.0 if e is None else e for e in errors]
        axis.bar(positions, heights, width, label=name, yerr=yerr, capsize=2)
    axis.set_xticks(range(len(panel.categories)))
    axis.set_xticklabels(panel.categories, rotation=30, ha="right")
    axis.set_ylabel(panel.ylabel)
    axis.set_title(panel.title)
    if panel.log_scale:
        axis.set_yscale("log")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize="small")
