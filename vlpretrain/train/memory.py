"""Memory figures of the step metrics: peak host RSS, and on CUDA the allocator's peaks.

Peaks since the process started (host) and since the device's peak statistics were last reset
(never, by us): the largest footprint so far is what decides whether the next stage, a larger
batch or another worker count still fits.
"""

from __future__ import annotations

import resource
import sys

import torch

GIB = 2**30


def peak_host_rss_bytes() -> int:
    """The process's peak resident set size (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak host RSS in GiB, plus the CUDA caching allocator's peak allocated and reserved
    memory in GiB when `device` is a CUDA device (a CPU run has no such figures)."""
    metrics = {"peak_host_rss_gib": peak_host_rss_bytes() / GIB}
    if device.type == "cuda":
        metrics["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        metrics["max_memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return metrics
