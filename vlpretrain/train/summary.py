"""How a stage reports its end: the summary lines and training_complete.json, and the rerun of
a stage that already finished.

    end of the stage (rank 0): export path, steps (this run / in all), tokens and samples over
        all ranks, wall time, skips by reason, and the next stage's model_name_or_path
        --> the log (summary_lines) and output_dir/training_complete.json (the same figures)
    start of a stage whose output_dir holds training_complete.json and the same config
        (fields that do not change a step aside, as on resume) with train.resume = "auto"
        --> one line, nothing trained, nothing exported (finished_run)

A finished stage is trained again only when asked: train.resume = "never" starts it over (the
earlier run is moved aside), train.resume = <a checkpoint directory> resumes from it (with the
stage's last checkpoint: exports again). A changed config goes the resume path, which refuses
it unless train.allow_changed_on_resume names the change (e.g. more max_steps).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vlpretrain.config import RunConfig, to_dict
from vlpretrain.train.checkpoint.resume import RESUME_SAFE_FIELDS, changed_fields

logger = logging.getLogger(__name__)

FINAL_MARKER = "training_complete.json"
"""Written last into output_dir: the stage finished and its export is complete."""
RECORDED_CONFIG = "config.resolved.json"
"""The resolved config of the run that writes output_dir (the config a finished stage had)."""


def finished_run(config: RunConfig) -> dict[str, Any] | None:
    """training_complete.json of a stage finished in output_dir with this config, or None.

    None when train.resume is not 'auto' (the user asks for a new start or names a
    checkpoint), when the stage is not finished, or when any field that changes what a step
    computes differs from the recorded config (the resume path then decides: refuse, or
    continue where train.allow_changed_on_resume allows it).
    """
    if config.train.resume != "auto":
        return None
    output_dir = Path(config.train.output_dir)
    marker, recorded = output_dir / FINAL_MARKER, output_dir / RECORDED_CONFIG
    if not (marker.is_file() and recorded.is_file()):
        return None
    changes = changed_fields(json.loads(recorded.read_text()), to_dict(config))
    if set(changes) - RESUME_SAFE_FIELDS:
        return None
    return dict(json.loads(marker.read_text()))


def already_finished_line(config: RunConfig, final: dict[str, Any]) -> str:
    """The one line of a rerun that has nothing to do."""
    output_dir = config.train.output_dir
    return (
        f"{output_dir} already holds this stage, finished at step {final.get('step', '?')} "
        f"with this config ({FINAL_MARKER}): nothing to do. Next stage: "
        f"model.model_name_or_path = {json.dumps(output_dir)}. To train it again set "
        "train.resume = 'never' (the earlier run is moved aside); to export it again, "
        "train.resume = its last checkpoint directory."
    )


def skipped_text(skipped: dict[str, int]) -> str:
    """'8 records skipped (malformed_json 4, missing_image 4)' or 'no record skipped'."""
    total = sum(skipped.values())
    if not total:
        return "no record skipped"
    by_reason = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
    return f"{total} record{'s' if total != 1 else ''} skipped ({by_reason})"


def summary_lines(final: dict[str, Any]) -> list[str]:
    """The end-of-stage summary from the figures of training_complete.json."""
    skipped = skipped_text(final["skipped_all_ranks"])
    return [
        f"stage finished: {final['step']} of {final['max_steps']} steps "
        f"({final['steps_this_run']} in this run, {format_seconds(final['wall_seconds'])}); "
        f"{final['tokens_seen_all_ranks']} tokens and {final['samples_seen_all_ranks']} "
        f"samples trained over {final['world_size']} rank(s); {skipped}",
        f"exported to {final['export_dir']}",
        f"next stage: model.model_name_or_path = {json.dumps(final['next_model_name_or_path'])}",
    ]


def format_seconds(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 2 h 03 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
