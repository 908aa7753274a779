"""Media files the data tests write: small real videos (PyAV encodes them, PyAV decodes them).

Imported as `from media_fixtures import write_video` (tests/ is on sys.path via conftest)."""

from __future__ import annotations

import io
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


def _raw_mpeg4(width: int, height: int, num_frames: int, first_brightness: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="m4v") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for k in range(num_frames):
            value = (first_brightness + k * 10) % 256
            pixels = np.full((height, width, 3), value, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_growing_video(
    path: Path, header_size: tuple[int, int], later_size: tuple[int, int], num_frames: int = 4
) -> None:
    """A raw MPEG-4 stream (.m4v) whose header, and first `num_frames` frames, are
    `header_size` (width, height), followed by `num_frames` frames of `later_size`: the
    stream header lies about the size of what decodes later."""
    first = _raw_mpeg4(*header_size, num_frames, 0)
    path.write_bytes(first + _raw_mpeg4(*later_size, num_frames, num_frames * 10))
