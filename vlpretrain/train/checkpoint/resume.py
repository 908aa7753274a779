"""What a resumed run must keep from the run that wrote the checkpoint: the configuration.

A resumed step must compute what the interrupted run would have computed, so every resolved
config field that differs from the checkpoint's is listed and refused, unless it is
operational only (RESUME_SAFE_FIELDS: logging, saving, timeouts) or the user names it in
train.allow_changed_on_resume. A fresh start (train.resume = 'never') in an output_dir that
holds an earlier run moves that run's checkpoints and metrics aside instead of mixing them,
into replaced-<UTC time>/, and keeps only the newest train.keep_replaced_runs of those.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlpretrain.errors import RefusedError

logger = logging.getLogger(__name__)


class ChangedConfigError(RefusedError, ValueError):
    """A resume whose configuration differs from the checkpoint's in fields that matter."""


RESUME_SAFE_FIELDS = frozenset(
    {
        "train.resume",
        "train.allow_changed_on_resume",
        "train.logging_steps",
        "train.save_steps",
        "train.save_total_limit",
        "train.async_checkpoint",
        "train.vision_checkpointing",
        "train.llm_checkpointing",
        "train.keep_replaced_runs",
        "train.report_to",
        "train.progress_bar",
        "train.peak_tflops",
        "train.max_nonfinite_steps",
        "train.collective_timeout_minutes",
        "train.preemption_signals",
        "train.preemption_grace_seconds",
        "data.cache_dir",
        "data.on_changed_media",
        "data.log_per_dataset",
        "eval.meta",
        "eval.steps",
        "eval.max_batches",
        "stream.prefetch_factor",
        "stream.pin_memory",
        "stream.num_workers",
    }
)
"""Fields that do not change what a step computes (evaluation leaves training untouched);
they may differ on resume. The worker count (like the world size) changes the order of the
data still to come, never which records an epoch holds: the loader re-deals what is left
(data.elastic, docs/checkpoints.md)."""

PREVIOUS_RUN_ITEMS = (
    "checkpoints",
    "metrics.jsonl",
    "tensorboard",
    "wandb",
    "trackers.json",
    "loss_curves.png",
)
"""What a fresh start moves aside; trackers.json goes too, so it starts new tracker runs."""
REPLACED_DIR = re.compile(r"^replaced-(\d{8}-\d{6})(?:-(\d+))?$")
"""replaced-<UTC time>, with -2, -3, ... for a second fresh start within the same second."""


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'section.key': value} of a nested config dict (lists and scalars as leaves)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def changed_fields(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{'section.key': (saved value, current value)} of every field that differs."""
    # Through JSON, as the checkpoint stored it: tuples become lists on both sides.
    old, new = flatten(json.loads(json.dumps(saved))), flatten(json.loads(json.dumps(current)))
    missing = object()
    return {
        name: (old.get(name, missing), new.get(name, missing))
        for name in sorted(set(old) | set(new))
        if old.get(name, missing) != new.get(name, missing)
    }


def check_config_on_resume(
    checkpoint: Path, saved: dict[str, Any], current: dict[str, Any], allowed: Iterable[str]
) -> None:
    """Raise ChangedConfigError listing the changed fields that are neither safe nor allowed."""
    allowed = set(allowed)
    changes = changed_fields(saved, current)
    refused = {k: v for k, v in changes.items() if k not in RESUME_SAFE_FIELDS | allowed}
    accepted = sorted(set(changes) - set(refused) - RESUME_SAFE_FIELDS)
    if accepted:
        logger.warning("resuming with changed %s (train.allow_changed_on_resume)", accepted)
    if refused:
        lines = [f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in refused.items()]
        names = ", ".join(f'"{k}"' for k in refused)
        raise ChangedConfigError(
            f"the configuration differs from the one that wrote {checkpoint}:\n  - "
            + "\n  - ".join(lines)
            + "\nA resumed step would not compute what the interrupted run would have. Keep "
            f"the checkpoint's values, accept the change with train.allow_changed_on_resume = "
            f"[{names}], or start over with train.resume = 'never'."
        )


def _show(value: Any) -> str:
    return "(absent)" if type(value) is object else repr(value)


def set_aside_previous_run(output_dir: Path, keep: int) -> Path | None:
    """Move an earlier run's checkpoints and metrics into output_dir/replaced-<UTC time>/,
    then delete all but the newest `keep` replaced-* directories (0: the earlier run is gone).
    Returns the new directory, or None when there was nothing to move."""
    present = [name for name in PREVIOUS_RUN_ITEMS if (output_dir / name).exists()]
    if not present:
        return None
    target = _new_replaced_dir(output_dir)
    for name in present:
        (output_dir / name).rename(target / name)
    logger.warning(
        "train.resume = 'never': moved the earlier run's %s to %s", ", ".join(present), target
    )
    _prune_replaced(output_dir, keep)
    return target


def _new_replaced_dir(output_dir: Path) -> Path:
    stem = time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
    for number in range(1, 1000):
        target = output_dir / (stem if number == 1 else f"{stem}-{number}")
        try:
            target.mkdir()
        except FileExistsError:
            continue
        return target
    raise FileExistsError(f"{output_dir}: {stem} and its 998 numbered variants all exist")


def _prune_replaced(output_dir: Path, keep: int) -> None:
    """Delete the replaced-* directories beyond the newest `keep` (ordered by their time)."""
    found = [
        (m, p) for p in output_dir.iterdir() if (m := REPLACED_DIR.match(p.name)) and p.is_dir()
    ]
    found.sort(key=lambda entry: (entry[0].group(1), int(entry[0].group(2) or 1)))
    for _, path in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(path)
        logger.warning("deleted %s (train.keep_replaced_runs = %d)", path, keep)
