"""Media files the data tests write: small real videos (PyAV encodes them, PyAV decodes them).

Imported as `from media_fixtures import write_video` (tests/ is on sys.path via conftest)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def write_video(path: Path, num_frames: int = 24, size: int = 32) -> None:
    """An mpeg4 clip of `num_frames` square frames at 8 fps; frame k has brightness 10·k, so
    decoded frames can be told apart."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(num_frames):
            pixels = np.full((size, size, 3), (k * 10) % 256, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
