"""README's demo figures: `vlpretrain demo` once per seed, then medians and ranges.

    python bench/demo_figures.py [--seeds 0 1 2] [--jobs 3] [--output demo_figures]
                                 [--set pretrain.FIELD=VALUE ...]

Each seed runs as `vlpretrain demo --seed K --output OUTPUT/seed_K` in its own process
(`--jobs` at a time, torch threads split between them), exactly as `make demo` runs seed 0;
`--set` passes component pretraining settings on to each run (`vlpretrain demo --set`).
Their summary.json files give the tables in OUTPUT/figures.md (also printed): held-out
caption accuracy per attribute and QA accuracy per question type for every stage and
baseline, as the median and min-max over the seeds, and each run's wall and CPU seconds.
Accuracies do not depend on --jobs; the seconds do (parallel runs share the cores), so
time `make demo` alone for the wall-clock figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlpretrain.config import ConfigError
from vlpretrain.demo.report import StageResult, format_seed_tables
from vlpretrain.demo.run import pretrain_settings

REPO = Path(__file__).resolve().parents[1]


def run_seed(seed: int, output: Path, threads: int, settings: list[str]) -> dict:
    """One demo run in a subprocess; its summary.json (the log goes to OUTPUT/seed_K.log)."""
    directory = output / f"seed_{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    with open(output / f"seed_{seed}.log", "w") as log:
        code = subprocess.call(
            [sys.executable, "-m", "vlpretrain", "demo", "--seed", str(seed), "--output",
             str(directory), *(part for item in settings for part in ("--set", item))],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    if code != 0:
        raise SystemExit(f"seed {seed} failed with exit code {code}; see {log.name}")
    return json.loads((directory / "summary.json").read_text())


def seconds_line(summaries: list[dict]) -> str:
    def spread(key: str) -> str:
        values = [s[key] for s in summaries]
        return f"{statistics.median(values):.0f} s [{min(values):.0f}-{max(values):.0f}]"

    return f"Per run: wall {spread('wall_s')}, CPU (user+sys) {spread('cpu_s')}."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=3, help="seeds run at the same time")
    parser.add_argument("--output", type=Path, default=Path("demo_figures"))
    parser.add_argument("--set", action="append", default=[], metavar="pretrain.FIELD=VALUE",
                        help="a component pretraining setting for every run")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        pretrain_settings(args.set)  # every bad setting reported before any run starts
    except ConfigError as error:
        parser.error(str(error))
    args.output.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        summaries = list(pool.map(lambda s: run_seed(s, args.output.resolve(), threads, args.set),
                                  args.seeds))  # fmt: skip
    per_seed = [[StageResult(**row) for row in s["stages"]] for s in summaries]
    text = format_seed_tables(per_seed, args.seeds) + "\n\n" + seconds_line(summaries)
    (args.output / "figures.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
