"""Resident-memory probes for the memory benchmarks (Linux /proc): current, peak, peak reset."""

from __future__ import annotations

from pathlib import Path


def rss_mib(field: str = "VmRSS") -> float:
    """VmRSS (current) or VmHWM (peak since start or the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Make VmHWM restart from the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")
