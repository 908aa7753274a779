"""Report the demo's stages: loss curves, eval accuracy bars and an ASCII summary table.

Reads the metrics JSONL lines that the training loop writes (objects with `step`, `loss`
and `lr`). Draws with matplotlib's object API onto the Agg canvas, so it touches no pyplot
global state and needs no display. It does not run or evaluate anything itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

_CHANCE_LABEL = "chance (majority answer per question type)"


@dataclass(frozen=True)
class StageResult:
    """What one demo stage did, for the table and the accuracy plot."""

    stage: str
    """Stage name, e.g. 'stage1_projector'; 'untrained' for the starting point."""
    num_trainable_params: int
    num_steps: int
    final_loss: float | None
    """Training loss of the last step; None when the stage did not train."""
    eval_accuracy: float | None
    """Fraction in [0, 1] of held-out questions answered right; None when not evaluated."""
    seconds: float
    """Wall-clock time of the stage."""


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The training rows of a metrics JSONL file: those with numeric `step` and `loss`.

    Other rows (eval summaries, startup records) are skipped; a line that is not JSON raises
    ValueError naming file and line.
    """
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from error
        if isinstance(row, dict) and _is_number(row.get("step")) and _is_number(row.get("loss")):
            rows.append({k: float(v) for k, v in row.items() if _is_number(v)})
    return rows


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plot_loss_curves(
    jsonl_paths_by_stage: Mapping[str, str | Path], output_png: str | Path
) -> Path:
    """Loss (top) and learning rate (bottom) of all stages on one continuous step axis.

    Stages are drawn in the mapping's order, each in its own colour, each shifted right by the
    last step of the stages before it; dashed lines mark the boundaries.
    """
    figure = Figure(figsize=(8.0, 5.5), layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    offset = 0.0
    for index, (stage, path) in enumerate(jsonl_paths_by_stage.items()):
        rows = read_metrics(path)
        colour = f"C{index % 10}"
        if index > 0:
            for axes in (loss_axes, lr_axes):
                axes.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
        steps = [offset + row["step"] for row in rows]
        loss_axes.plot(steps, [row["loss"] for row in rows], color=colour, label=stage)
        lr_rows = [(offset + row["step"], row["lr"]) for row in rows if "lr" in row]
        lr_axes.plot([s for s, _ in lr_rows], [lr for _, lr in lr_rows], color=colour)
        offset = max(steps, default=offset)
    loss_axes.set_ylabel("training loss")
    loss_axes.set_title("loss per stage")
    loss_axes.grid(alpha=0.3)
    if jsonl_paths_by_stage:
        loss_axes.legend(loc="upper right")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step (stages back to back)")
    lr_axes.grid(alpha=0.3)
    return _save(figure, output_png)


def plot_accuracy(
    results: Sequence[StageResult], output_png: str | Path, chance: float | None = None
) -> Path:
    """One bar of eval accuracy per stage ('n/a' where not evaluated), with the chance line."""
    if not results:
        raise ValueError("plot_accuracy needs at least one StageResult")
    figure = Figure(figsize=(max(4.0, 1.3 * len(results) + 2), 4.0), layout="constrained")
    axes = figure.subplots()
    names = [r.stage for r in results]
    heights = [r.eval_accuracy if r.eval_accuracy is not None else 0.0 for r in results]
    bars = axes.bar(names, heights, color=[f"C{i % 10}" for i in range(len(results))])
    labels = [_percent(r.eval_accuracy) if r.eval_accuracy is not None else "n/a" for r in results]
    axes.bar_label(bars, labels=labels, padding=2)
    if chance is not None:
        axes.axhline(chance, color="black", linestyle="--", linewidth=1.0, label=_CHANCE_LABEL)
        axes.legend(loc="upper left")
    axes.set_ylim(0.0, 1.1)
    axes.set_ylabel("eval accuracy")
    axes.set_title("held-out accuracy after each stage")
    axes.tick_params(axis="x", labelrotation=15)
    return _save(figure, output_png)


def format_table(results: Sequence[StageResult], chance: float | None = None) -> str:
    """An ASCII table, one row per stage; a chance line below it when `chance` is given."""
    header = ("stage", "trainable params", "steps", "final loss", "eval acc", "seconds")
    rows = [
        (
            r.stage,
            f"{r.num_trainable_params:,}",
            str(r.num_steps),
            _maybe(r.final_loss, "{:.4f}"),
            _percent(r.eval_accuracy) if r.eval_accuracy is not None else "-",
            f"{r.seconds:.1f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: tuple[str, ...]) -> str:
        # The stage name reads best left-aligned, numbers right-aligned.
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    lines = [rule, line(header), rule, *(line(row) for row in rows), rule]
    if chance is not None:
        lines.append(f"{_CHANCE_LABEL}: {_percent(chance)}")
    return "\n".join(lines)


def _maybe(value: float | None, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else fmt.format(value)


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}%"


def _save(figure: Figure, output_png: str | Path) -> Path:
    path = Path(output_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path
