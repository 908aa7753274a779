"""SIGKILL a 2-rank run at random moments, resume each time, compare with an uninterrupted run.

    python bench/sigkill_resume.py [--kills 10] [--steps 20] [--seed 0] [--out DIR]

1. reference: torchrun 2 ranks (FSDP2, gloo), the tiny stage-2 run of the test suite, N steps,
   a checkpoint every step (so many kills land inside a save).
2. victim: the same run in another output_dir, started again and again; each time the whole
   job (launcher and both ranks at once) gets SIGKILL at a random moment: every fourth kill
   during the start-up, the others a random fraction of a step after 1-2 new steps (inside a
   step, a checkpoint save or the next resume), until `--kills` kills happened; then it runs
   to the end. Every restart resumes from the newest intact checkpoint and takes the run lock
   over from the killed job.
3. verdict: metrics.jsonl of the victim holds each step once, every loss and grad norm equals
   the reference bit for bit, and so does every tensor of the exported model.

Prints one JSON summary (also written to OUT/summary.json). Not part of `make test`: ten
kills take several minutes of 2-rank start-ups.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from train_fixtures import build_train_assets, cli_env, read_metrics, stage_raw, write_stage  # noqa: E402

from vlpretrain.train.checkpoint.store import list_checkpoints  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(config: Path, log: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "vlpretrain", "train", str(config),
    ]  # fmt: skip
    with log.open("a") as handle:
        return subprocess.Popen(
            command,
            env=cli_env(deterministic=True),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # launcher and ranks share one process group: one kill
        )


def stage(assets, out: Path, name: str, steps: int) -> Path:
    raw = stage_raw(
        assets,
        out / name,
        stage="stage2",
        max_steps=steps,
        save_steps=1,
        dist={"strategy": "fsdp"},
        train={"save_total_limit": 2},
    )
    return write_stage(out / f"{name}.toml", raw)


def run_reference(config: Path, out: Path) -> tuple[float, float]:
    """Run to the end; returns (seconds to the first logged step, seconds per later step)."""
    started = time.monotonic()
    process = start(config, out / "reference.log")
    first = None
    while process.poll() is None:
        if first is None and (out / "reference" / "metrics.jsonl").exists():
            first = time.monotonic() - started
        time.sleep(0.05)
    if process.returncode != 0:
        raise SystemExit(f"reference run failed; see {out / 'reference.log'}")
    total = time.monotonic() - started
    steps = len(read_metrics(out / "reference"))
    first = first or total
    return first, max((total - first) / max(steps - 1, 1), 0.05)


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (torchrun starts each rank in its own session)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and both ranks at the same moment."""
    ranks = children(process.pid)
    for pid in [process.pid, *ranks]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def last_logged_step(output_dir: Path) -> int:
    try:
        lines = (output_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def wait_for_step(process: subprocess.Popen, output_dir: Path, step: int) -> bool:
    while last_logged_step(output_dir) < step:
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    return True


def kill_loop(config: Path, out: Path, kills: int, startup: float, per_step: float, seed: int):
    """Kill `kills` times: every fourth kill at a random moment of the start-up (loading,
    resume), the others a random fraction of a step after the run logged 1-2 new steps
    (inside a step, a save, or the resume of the next start)."""
    rng = random.Random(seed)
    victim = out / "victim"
    events = []
    while len(events) < kills:
        process = start(config, out / "victim.log")
        resumed_at = max([s for s, _ in list_checkpoints(victim)] or [0])
        if len(events) % 4 == 3:
            moment = f"start-up + {rng.uniform(0.2, 1.0) * startup:.1f} s"
            time.sleep(float(moment.split("+ ")[1][:-2]))
        else:
            target = last_logged_step(victim) + rng.randint(1, 2)
            if not wait_for_step(process, victim, target):
                break
            delay = rng.uniform(0.0, per_step)
            moment = f"{delay:.2f} s after step {target}"
            time.sleep(delay)
        if process.poll() is not None:
            break
        saving = any(p.name.endswith(".tmp") for p in (victim / "checkpoints").glob("step-*"))
        kill_job(process)
        saved = [s for s, _ in list_checkpoints(victim)]
        events.append(
            {
                "moment": moment,
                "resumed_from": resumed_at,
                "during_save": saving,
                "checkpoints_after": saved,
            }
        )
        print(f"kill {len(events)}: {moment}, checkpoints {saved}", flush=True)
    process = start(config, out / "victim.log")
    process.wait()
    return events, process.returncode


def compare(out: Path) -> dict:
    reference, victim = read_metrics(out / "reference"), read_metrics(out / "victim")
    keys = ("loss", "grad_norm", "lr")
    same_metrics = [r["step"] for r in victim] == [r["step"] for r in reference] and all(
        a[k] == b[k] for a, b in zip(victim, reference, strict=True) for k in keys
    )
    a = load_file(str(out / "reference" / "model.safetensors"))
    b = load_file(str(out / "victim" / "model.safetensors"))
    same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (out / "victim.log").read_text()
    return {
        "steps_logged_once_each": [r["step"] for r in victim] == list(range(1, len(victim) + 1)),
        "losses_bit_identical": same_metrics,
        "weights_bit_identical": same_weights,
        "num_tensors": len(a),
        "fallbacks_to_older_checkpoint": log.count("skipping checkpoint"),
        "lock_takeovers": log.count("took over"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="sigkill_resume_"))
    out.mkdir(parents=True, exist_ok=True)
    assets = build_train_assets(out / "assets")
    reference = stage(assets, out, "reference", args.steps)
    victim = stage(assets, out, "victim", args.steps)
    cpu_start = os.times()
    startup, per_step = run_reference(reference, out)
    events, code = kill_loop(victim, out, args.kills, startup, per_step, args.seed)
    summary = {
        "kills": len(events),
        "kills_during_save": sum(1 for e in events if e.get("during_save")),
        "final_exit_code": code,
        "startup_s": round(startup, 1),
        "step_s": round(per_step, 2),
        **compare(out),
        "events": events,
        "children_cpu_s": round(os.times().children_user - cpu_start.children_user, 1),
        "out": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    ok = summary["losses_bit_identical"] and summary["weights_bit_identical"] and code == 0
    raise SystemExit(0 if ok and summary["kills"] >= args.kills else 1)


if __name__ == "__main__":
    main()
