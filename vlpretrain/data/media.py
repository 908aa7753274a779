"""Decode media into RGB PIL images: still images (Pillow) and sampled video frames (PyAV).

    image path --load_image--> PIL RGB
    video file / frame folder + rng --load_video_frames--> [PIL RGB] * K

No tiling or normalisation here (see data.tiling). Every failure becomes a RecordError
(missing_image, corrupt_image, image_too_large, video_error). Truncated files are reported as
corrupt: we never set Pillow's LOAD_TRUNCATED_IMAGES. Oversized images and videos are refused
by our own pixel limit, read from the file header before any pixel is decoded: a 12000x12000
PNG can be 140 KB on disk and take seconds to decode and tile.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import av
import numpy as np
from PIL import Image

from vlpretrain.data.records import RecordError

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
"""Largest width x height decoded (8000x6000 photos and 8K UHD frames fit; 12000x12000 not)."""
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open `path` fully and convert it to RGB.

    Raises:
        RecordError: missing_image if the file does not exist, corrupt_image if it cannot be
            decoded completely or has more than `max_pixels` pixels.
    """
    if not path.is_file():
        raise RecordError("missing_image", f"no image file {path}")
    try:
        with warnings.catch_warnings():
            # our max_pixels replaces Pillow's bomb warning (raised on open, from the header)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            check_pixels(path, *image.size, max_pixels)
            image.load()
            return image.convert("RGB")
    except RecordError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise RecordError("corrupt_image", f"{path}: {err}") from err


def check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    """Raise RecordError('image_too_large') when width x height exceeds `max_pixels`."""
    if width * height > max_pixels:
        raise RecordError(
            "image_too_large",
            f"{path}: {width}x{height} = {width * height} pixels exceeds "
            f"data.max_image_pixels = {max_pixels}",
        )


def sample_frame_indices(num_frames: int, num_wanted: int, rng: np.random.Generator) -> list[int]:
    """'rand' sampling (spec section 4.7): one random frame per equal interval of [0, n).

    `min(num_wanted, num_frames)` intervals from linspace(0, n, k+1).astype(int); a frame is
    drawn uniformly from each (including its last frame, fixing the reference's off-by-one);
    the result is padded with its last index up to `num_wanted`.
    """
    if num_frames <= 0:
        return []
    count = min(num_wanted, num_frames)
    edges = np.linspace(0, num_frames, count + 1).astype(int)
    picks = [int(rng.integers(edges[k], edges[k + 1])) for k in range(count)]
    return picks + [picks[-1]] * (num_wanted - count)


def draw_num_frames(min_num: int, max_num: int, rng: np.random.Generator) -> int:
    """K, uniform in [min_num, max_num] inclusive."""
    return int(rng.integers(min_num, max_num + 1))


def _frame_key(path: Path) -> tuple[int, str]:
    match = re.search(r"(\d+)$", path.stem)
    return (int(match.group(1)) if match else -1, path.name)


def _folder_frames(
    folder: Path, num_wanted: int, rng: np.random.Generator, max_pixels: int
) -> list[Image.Image]:
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_frame_key
    )
    if not files:
        raise RecordError("video_error", f"frame folder {folder} has no image files")
    if len(files) > num_wanted:
        files = [files[i] for i in sample_frame_indices(len(files), num_wanted, rng)]
    try:
        return [load_image(p, max_pixels) for p in files]
    except RecordError as err:
        reason = err.reason if err.reason == "image_too_large" else "video_error"
        raise RecordError(reason, f"frame folder {folder}: {err.detail}") from err


def _clip_window(num_frames: int, fps: float, clip: tuple[float, float] | None) -> range:
    """Frame indices inside `clip` (all frames if None)."""
    if clip is None:
        return range(num_frames)
    start = int(clip[0] * fps)
    stop = min(num_frames, start + int((clip[1] - clip[0]) * fps))
    return range(min(start, num_frames), stop)


def _decode_frames(
    path: Path,
    num_wanted: int,
    rng: np.random.Generator,
    clip: tuple[float, float] | None,
    max_pixels: int,
) -> list[Image.Image]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        check_pixels(path, stream.codec_context.width, stream.codec_context.height, max_pixels)
        fps = float(stream.average_rate or stream.guessed_rate or 1)
        num_frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
    window = _clip_window(num_frames, fps, clip)
    if len(window) == 0:
        raise RecordError("video_error", f"{path}: no frames in clip {clip} ({num_frames} frames)")
    wanted = [window[i] for i in sample_frame_indices(len(window), num_wanted, rng)]
    decoded: dict[int, Image.Image] = {}
    targets = set(wanted)
    with av.open(str(path)) as container:
        for position, frame in enumerate(container.decode(video=0)):
            if position in targets:
                decoded[position] = frame.to_image().convert("RGB")
            if position >= max(targets):
                break
    if not decoded:
        raise RecordError("video_error", f"{path}: could not decode any requested frame")
    last = decoded[max(decoded)]  # the header over-counted: reuse the last decoded frame
    return [decoded.get(i, last) for i in wanted]


def load_video_frames(
    path: Path,
    min_num_frame: int,
    max_num_frame: int,
    rng: np.random.Generator,
    clip: tuple[float, float] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[Image.Image]:
    """K frames (K drawn in [min_num_frame, max_num_frame]) of a video file or frame folder.

    Deterministic given the state of `rng`. Raises RecordError('video_error', ...) on failure,
    RecordError('image_too_large', ...) for frames of more than `max_pixels` pixels.
    """
    num_wanted = draw_num_frames(min_num_frame, max_num_frame, rng)
    if path.is_dir():
        return _folder_frames(path, num_wanted, rng, max_pixels)
    if not path.is_file():
        raise RecordError("video_error", f"no video file or frame folder {path}")
    try:
        return _decode_frames(path, num_wanted, rng, clip, max_pixels)
    except RecordError:
        raise
    except (OSError, ValueError, IndexError, av.FFmpegError) as err:
        raise RecordError("video_error", f"{path}: {err}") from err
