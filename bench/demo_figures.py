"""README's demo figures: `vlpretrain demo` once per seed, then medians and ranges.

    python bench/demo_figures.py [--seeds 0 1 2] [--jobs 1] [--output demo_figures]

Each seed runs as `vlpretrain demo --seed K --output OUTPUT/seed_K` in its own process,
`--jobs` at a time with the cores' torch threads split between them. Every run starts from the
same shipped components (tools/make_demo_components.py); the seed draws the dataset and seeds
the stages' training. Their summary.json files give the tables in OUTPUT/figures.md (also
printed): held-out caption accuracy per attribute and QA accuracy per question type for every
stage and baseline, as the median and min-max over the seeds, each run's wall and CPU seconds,
and the CPU and thread count.

The default, one run at a time, runs every seed exactly as `make demo` runs seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlpretrain.demo.report import StageResult, format_seed_tables

REPO = Path(__file__).resolve().parents[1]


def run_seed(seed: int, output: Path, threads: int) -> dict:
    """One demo run in a subprocess; its summary.json (the log goes to OUTPUT/seed_K.log)."""
    directory = output / f"seed_{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    with open(output / f"seed_{seed}.log", "w") as log:
        code = subprocess.call(
            [sys.executable, "-m", "vlpretrain", "demo", "--seed", str(seed), "--output",
             str(directory)],
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


def machine_line(threads: int) -> str:
    """Which CPU ran the figures, and with how many torch threads per run."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        model = names[0] if names else model
    return f"Machine: {model}, {os.cpu_count()} cores, {threads} torch thread(s) per run."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at the same time")
    parser.add_argument("--output", type=Path, default=Path("demo_figures"))
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        summaries = list(pool.map(lambda s: run_seed(s, args.output.resolve(), threads),
                                  args.seeds))  # fmt: skip
    per_seed = [[StageResult(**row) for row in s["stages"]] for s in summaries]
    text = "\n\n".join([format_seed_tables(per_seed, args.seeds), seconds_line(summaries),
                        machine_line(threads)])  # fmt: skip
    (args.output / "figures.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
