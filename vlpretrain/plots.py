"""Curves of a run drawn from its metrics.jsonl: each stage's loss_curves.png, `vlpretrain plot`,
and the demo's pictures (which share the figure and file handling here).

    metrics.jsonl --read_metrics--> rows {key: number} --plot_metrics(PANELS)--> PNG
    panels, top to bottom, each drawn only when some row has its keys:
        loss (and loss/<dataset>), learning rate (and lr/<group>), tokens/s, MFU,
        seconds per step (the whole step and the data wait within it)

matplotlib is an optional extra (vlpretrain[plots]), imported only when a picture is drawn; a
stage that ends without it logs how to get the picture instead. Figures are drawn with
matplotlib's object API on the Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpretrain.packages import MissingPackageError, require

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

PLOTS_EXTRA = "vlpretrain[plots]"
"""The extra that installs matplotlib."""
STAGE_PLOT = "loss_curves.png"
"""The picture each stage draws into its output_dir at its end."""
Rows = list[dict[str, float]]
"""The numeric values of a metrics file's step records (read_metrics)."""
LINE_STYLES = ("-", "--", ":", "-.")
"""Series of one panel when several stages share it (the colour then tells the stage)."""


@dataclass(frozen=True)
class Panel:
    """One panel: the metrics keys it draws and how."""

    title: str
    keys: tuple[str, ...]
    """Keys drawn as they are named."""
    prefixes: tuple[str, ...] = ()
    """Key families drawn one line per member, e.g. 'loss/' for the loss of each dataset."""
    log_scale: bool = False

    def series(self, rows: Sequence[Mapping[str, float]]) -> list[str]:
        """The keys of this panel that some row has: named keys first, then families."""
        present = {key for row in rows for key in row}
        family = sorted(k for k in present if k.startswith(self.prefixes)) if self.prefixes else []
        return [key for key in self.keys if key in present] + family


PANELS = (
    Panel("loss", ("loss",), ("loss/",), log_scale=True),
    Panel("learning rate", ("lr",), ("lr/",)),
    Panel("tokens/s", ("tokens_per_second",)),
    Panel("MFU", ("mfu",)),
    Panel("seconds per step", ("seconds", "data_wait_seconds")),
)
"""Top to bottom; `plot_metrics(panels=...)` picks some by title."""


def new_figure(needed_for: str, **options: Any) -> Figure:
    """A matplotlib Figure (Agg, no pyplot), or MissingPackageError naming the plots extra."""
    figure_module = require("matplotlib.figure", needed_for, PLOTS_EXTRA)
    return figure_module.Figure(layout="constrained", **options)


def save_figure(figure: Figure, output_png: str | Path) -> Path:
    """Write `figure` as a PNG (parent directories made); returns the path."""
    path = Path(output_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The numeric values of each record of a metrics JSONL file that has a numeric `step`.

    Raises:
        ValueError: a line is not JSON (names file and line).
    """
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from error
        if isinstance(row, dict) and _is_number(row.get("step")):
            rows.append({k: float(v) for k, v in row.items() if _is_number(v)})
    return rows


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plot_metrics(
    jsonl_paths_by_stage: Mapping[str, str | Path],
    output_png: str | Path,
    panels: Sequence[str] | None = None,
) -> Path:
    """The panels (titles from PANELS; None: all) that have data, for one stage or several.

    Several stages are drawn back to back on one step axis in the mapping's order, each in
    its own colour and shifted right by the last step of the stages before it, with dashed
    lines at the boundaries.

    Raises:
        ValueError: no record has any of the panels' keys.
        MissingPackageError: matplotlib is not installed.
    """
    rows_by_stage = {stage: read_metrics(path) for stage, path in jsonl_paths_by_stage.items()}
    drawn = panels_to_draw(rows_by_stage, panels)
    if not drawn:
        chosen = [p for p in PANELS if panels is None or p.title in panels]
        names = ", ".join(str(path) for path in jsonl_paths_by_stage.values())
        raise ValueError(f"nothing to plot: no step record with {_keys(chosen)} in {names}")
    figure = new_figure("drawing loss curves", figsize=(8.0, 1.8 + 1.8 * len(drawn)))
    heights = [2 if panel.title == "loss" else 1 for panel in drawn]
    axes_list = figure.subplots(len(drawn), 1, sharex=True, squeeze=False, height_ratios=heights)
    several = len(rows_by_stage) > 1
    for axes, panel in zip(axes_list[:, 0], drawn, strict=True):
        _draw_panel(axes, panel, rows_by_stage)
    axes_list[-1, 0].set_xlabel("step (stages back to back)" if several else "step")
    return save_figure(figure, output_png)


def panels_to_draw(rows_by_stage: Mapping[str, Rows], panels: Sequence[str] | None) -> list[Panel]:
    """The panels of PANELS (those titled in `panels`; None: all) that some row has keys of."""
    all_rows = [row for rows in rows_by_stage.values() for row in rows]
    return [p for p in PANELS if (panels is None or p.title in panels) and p.series(all_rows)]


def _keys(panels: Sequence[Panel]) -> str:
    return ", ".join([*(k for p in panels for k in p.keys), *(f"{x}*" for p in panels
                                                           for x in p.prefixes)])  # fmt: skip


def _draw_panel(axes: Axes, panel: Panel, rows_by_stage: Mapping[str, Rows]) -> None:
    several = len(rows_by_stage) > 1
    offset, num_lines = 0.0, 0
    for stage_index, (stage, rows) in enumerate(rows_by_stage.items()):
        if stage_index > 0:
            axes.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
        for series_index, key in enumerate(panel.series(rows)):
            points = [(offset + row["step"], row[key]) for row in rows if key in row]
            colour = f"C{(stage_index if several else series_index) % 10}"
            style = LINE_STYLES[series_index % len(LINE_STYLES)] if several else "-"
            label = key if not several else stage if series_index == 0 else f"{stage} {key}"
            axes.plot([s for s, _ in points], [v for _, v in points], color=colour,
                      linestyle=style, label=label)  # fmt: skip
            num_lines += 1
        offset = max((offset + row["step"] for row in rows), default=offset)
    axes.set_ylabel(panel.title)
    if panel.log_scale:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    if num_lines > 1:
        axes.legend(loc="upper right", fontsize="small")


def plot_stage(output_dir: str | Path) -> Path:
    """output_dir/loss_curves.png from output_dir/metrics.jsonl.

    Raises:
        FileNotFoundError: output_dir has no metrics.jsonl.
        ValueError, MissingPackageError: as plot_metrics.
    """
    output_dir = Path(output_dir)
    metrics = output_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{output_dir} has no metrics.jsonl (a stage's train.output_dir)")
    return plot_metrics({output_dir.name: metrics}, output_dir / STAGE_PLOT)


def plot_stage_or_say_how(output_dir: str | Path) -> Path | None:
    """plot_stage at the end of a stage; without matplotlib, one line saying how to get it."""
    try:
        path = plot_stage(output_dir)
    except MissingPackageError:
        logger.info("no %s: matplotlib is not installed (pip install '%s', then `vlpretrain "
                    "plot %s`)", STAGE_PLOT, PLOTS_EXTRA, output_dir)  # fmt: skip
        return None
    logger.info("loss curves: %s", path)
    return path
