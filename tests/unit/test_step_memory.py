"""Step metrics carry the memory peaks: host RSS always, the CUDA allocator's on CUDA only."""

from __future__ import annotations

import resource

import torch

from vlpretrain.train import memory
from vlpretrain.train.loop import LINE_KEYS


def test_cpu_runs_report_peak_host_rss_and_no_device_figures():
    metrics = memory.memory_metrics(torch.device("cpu"))
    assert set(metrics) == {"peak_host_rss_gib"}
    # ru_maxrss is in KiB on Linux: KiB * 1024 / 2**30 GiB
    expected = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    assert 0 < metrics["peak_host_rss_gib"] <= expected + 1e-3


def test_cuda_runs_add_the_allocators_peaks(monkeypatch):
    asked = []

    def allocated(device):
        asked.append(device)
        return 3 * 2**30

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 5 * 2**29)
    metrics = memory.memory_metrics(torch.device("cuda", 1))
    assert metrics["max_memory_allocated_gib"] == 3.0
    assert metrics["max_memory_reserved_gib"] == 2.5  # 5 * 2**29 bytes = 2.5 GiB
    assert asked == [torch.device("cuda", 1)]  # the run's own device, not device 0


def test_the_step_line_shows_host_and_device_peaks():
    assert {"peak_host_rss_gib", "max_memory_allocated_gib"} <= set(LINE_KEYS)
