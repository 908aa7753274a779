"""Report the demo's stages: tables, accuracy bars, held-out samples, seed summaries.

Reads the StageResults the runner collects; the loss curves are vlpretrain.plots' (the same
picture every stage draws, its stages back to back), and the accuracy bars use its figure and
file handling. It does not run or evaluate anything itself.
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from vlpretrain.plots import new_figure, save_figure
from vlpretrain.testing.shapes import CAPTION_ATTRIBUTES, SINGLE_IMAGE_QUESTION_TYPES, score_answer

if TYPE_CHECKING:
    from vlpretrain.demo.evaluate import EvalItem, StageEval


@dataclass(frozen=True)
class StageResult:
    """What one demo row did: a trained stage, the untrained start, or a baseline."""

    stage: str
    """Row name, e.g. 'stage1'; 'untrained' for the starting point."""
    num_trainable_params: int
    num_steps: int
    final_loss: float | None
    """Training loss of the last step; None when the row did not train."""
    qa_by_type: Mapping[str, float]
    """Held-out QA accuracy in [0, 1] per question type (empty: not evaluated)."""
    caption_by_attribute: Mapping[str, float]
    """Held-out caption accuracy in [0, 1] per attribute (empty: not evaluated)."""
    seconds: float
    """Wall-clock time of the stage's training."""

    @property
    def qa_accuracy(self) -> float | None:
        """Mean over question types (the eval set has as many questions of each)."""
        return _mean(self.qa_by_type)

    @property
    def caption_accuracy(self) -> float | None:
        """Mean over caption attributes."""
        return _mean(self.caption_by_attribute)


def _mean(values: Mapping[str, float]) -> float | None:
    return sum(values.values()) / len(values) if values else None


def plot_accuracy(results: Sequence[StageResult], output_png: str | Path) -> Path:
    """Grouped bars: caption accuracy per attribute (left), QA accuracy per question type
    (right), one bar per row that has the metric."""
    if not results:
        raise ValueError("plot_accuracy needs at least one StageResult")
    figure = new_figure("the demo's accuracy bars", figsize=(13.0, 4.2))
    caption_axes, qa_axes = figure.subplots(1, 2, width_ratios=[2, 3])
    panels = (
        (caption_axes, CAPTION_ATTRIBUTES, "caption_by_attribute", "captions: attribute right"),
        (qa_axes, SINGLE_IMAGE_QUESTION_TYPES, "qa_by_type", "questions: answer right"),
    )
    for axes, groups, key, title in panels:
        rows = [r for r in results if getattr(r, key)]
        width = 0.8 / max(1, len(rows))
        for index, row in enumerate(rows):
            values = getattr(row, key)
            xs = [g + (index - (len(rows) - 1) / 2) * width for g in range(len(groups))]
            axes.bar(xs, [values.get(name, 0.0) for name in groups], width,
                     label=row.stage, color=f"C{results.index(row) % 10}")  # fmt: skip
        axes.set_xticks(range(len(groups)), list(groups))
        axes.set_ylim(0.0, 1.05)
        axes.set_title(f"held-out {title}")
        axes.grid(alpha=0.3, axis="y")
    caption_axes.set_ylabel("accuracy")
    qa_axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return save_figure(figure, output_png)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """ASCII table: first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    return "\n".join([rule, line(header), rule, *(line(row) for row in rows), rule])


def format_tables(results: Sequence[StageResult]) -> str:
    """The summary table (one row per stage or baseline), then the per-attribute caption
    table and the per-question-type QA table."""
    header = ("stage", "trainable params", "steps", "final loss", "caption acc", "QA acc",
              "seconds")  # fmt: skip
    rows = [
        (
            r.stage,
            f"{r.num_trainable_params:,}",
            str(r.num_steps),
            _maybe(r.final_loss, "{:.4f}"),
            _maybe_percent(r.caption_accuracy),
            _maybe_percent(r.qa_accuracy),
            f"{r.seconds:.1f}",
        )
        for r in results
    ]
    captioned = [r for r in results if r.caption_by_attribute]
    caption_rows = [
        (r.stage, *(_percent(r.caption_by_attribute[a]) for a in CAPTION_ATTRIBUTES))
        for r in captioned
    ]
    answered = [r for r in results if r.qa_by_type]
    qa_rows = [
        (r.stage, *(_maybe_percent(r.qa_by_type.get(t)) for t in SINGLE_IMAGE_QUESTION_TYPES))
        for r in answered
    ]
    return "\n\n".join(
        [
            _table(header, rows),
            "held-out caption accuracy per attribute\n"
            + _table(("stage", *CAPTION_ATTRIBUTES), caption_rows),
            "held-out QA accuracy per question type\n"
            + _table(("stage", *SINGLE_IMAGE_QUESTION_TYPES), qa_rows),
        ]
    )


def _spread(values: Sequence[float]) -> str:
    """'median [min-max]' in percent."""
    low, high = min(values), max(values)
    return f"{100 * statistics.median(values):.1f} [{100 * low:.1f}-{100 * high:.1f}]"


def format_seed_tables(per_seed: Sequence[Sequence[StageResult]], seeds: Sequence[int]) -> str:
    """Markdown tables of the median and min-max over seeds: summary, caption attributes,
    QA question types. Rows are matched by stage name."""
    names = [r.stage for r in per_seed[0]]
    by_name = {name: [next(r for r in rows if r.stage == name) for rows in per_seed]
               for name in names}  # fmt: skip

    def cell(rows: list[StageResult], value: str, key: str | None = None) -> str:
        numbers = [getattr(r, value) if key is None else getattr(r, value).get(key)
                   for r in rows]  # fmt: skip
        return "-" if any(v is None for v in numbers) else _spread(numbers)

    def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])

    summary = [(name, cell(rows, "caption_accuracy"), cell(rows, "qa_accuracy"))
               for name, rows in by_name.items()]  # fmt: skip
    captions = [(name, *(cell(rows, "caption_by_attribute", a) for a in CAPTION_ATTRIBUTES))
                for name, rows in by_name.items() if rows[0].caption_by_attribute]  # fmt: skip
    questions = [(name, *(cell(rows, "qa_by_type", t) for t in SINGLE_IMAGE_QUESTION_TYPES))
                 for name, rows in by_name.items() if rows[0].qa_by_type]  # fmt: skip
    seed_list = ", ".join(str(s) for s in seeds)
    return "\n\n".join(
        [
            f"Held-out accuracy in %, median [min-max] over seeds {seed_list}:",
            markdown(
                (
                    "stage",
                    "caption accuracy (mean of 4 attributes)",
                    "QA accuracy (mean of 6 types)",
                ),
                summary,
            ),  # fmt: skip
            markdown(("caption attribute", *CAPTION_ATTRIBUTES), captions),
            markdown(("QA question type", *SINGLE_IMAGE_QUESTION_TYPES), questions),
        ]
    )


def _image_data_uri(path: Path, scale: int = 3) -> str:
    with Image.open(path) as image:
        big = image.convert("RGB").resize((image.width * scale, image.height * scale),
                                          Image.Resampling.NEAREST)  # fmt: skip
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_samples_html(
    items: Sequence[EvalItem],
    evaluations: Mapping[str, StageEval],
    output_html: str | Path,
    num_samples: int = 8,
) -> Path:
    """A page of the first `num_samples` held-out images, each with every stage's caption and
    answer beside the truth (right answers green, wrong ones red)."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>vlpretrain demo: held-out samples</title>",
        "<style>body{font-family:sans-serif} table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        ".right{color:#176b2c}.wrong{color:#b01c1c}</style>",
        "<h1>Held-out images: what each stage says</h1>",
        "<p>Layouts never shown in training. Captions are scored per attribute, answers by "
        "their first word.</p>",
    ]
    for index, item in enumerate(items[:num_samples]):
        rows = [f"<tr><th>truth</th><td>{html.escape(item.caption)}</td>"
                f"<td>{html.escape(item.answer)}</td></tr>"]  # fmt: skip
        for stage, evaluation in evaluations.items():
            caption = evaluation.captions[index] if evaluation.captions else ""
            answer = evaluation.answers[index]
            verdict = "right" if score_answer(answer, item.answer) else "wrong"
            rows.append(f"<tr><th>{html.escape(stage)}</th><td>{html.escape(caption)}</td>"
                        f"<td class='{verdict}'>{html.escape(answer)}</td></tr>")  # fmt: skip
        parts.append(
            f"<h2>{html.escape(item.image.name)}</h2><img src='{_image_data_uri(item.image)}'>"
            f"<p>Q: {html.escape(item.question.replace('<image>', '').strip())}</p>"
            "<table><tr><th></th><th>caption</th><th>answer</th></tr>"
            + "".join(rows) + "</table>"
        )  # fmt: skip
    path = Path(output_html)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def _maybe(value: float | None, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else fmt.format(value)


def _maybe_percent(fraction: float | None) -> str:
    return "-" if fraction is None else _percent(fraction)


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}%"
