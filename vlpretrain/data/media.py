"""Decode media into RGB PIL images: still images (Pillow) and sampled video frames (PyAV).

    image path --load_image--> PIL RGB
    video file / frame folder + rng --load_video_frames--> [PIL RGB] * K

No tiling or normalisation here (see data.tiling). Every failure becomes a RecordError
(missing_image, corrupt_image, image_too_large, video_error). Truncated files are reported as
corrupt: we never set Pillow's LOAD_TRUNCATED_IMAGES. Oversized images and videos are refused
by our own pixel limit, read from the file header before any pixel is decoded: a 12000x12000
PNG can be 140 KB on disk and take seconds to decode and tile. The header is only a claim, so
the limit is checked again on what decodes: an image after load, every video frame before it
is converted (and FFmpeg's decoder refuses frames far above it before allocating them: a
stream whose header says 64x48 may carry 12000x12000 frames). It is the one limit: Pillow's
own decompression-bomb check (179 MP) is off while we open a file, so it neither refuses
as corrupt_image what ours allows nor refuses, unnamed, what ours refuses.

Media named by URL (data.remote) are read with ranged requests: an image's header first (a
prefix of HEADER_BYTES, doubled until Pillow can read the size), so the pixel limit still
applies before the rest is fetched and decoded; a video object is fetched whole (PyAV then
reads the header from memory before decoding); a URL prefix stands for a frame folder. A
missing object is missing_image / video_error, a read that keeps failing is read_error;
both name the URL. Local paths never go through fsspec.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from vlpretrain import packages
from vlpretrain.data import remote
from vlpretrain.data.records import RecordError
from vlpretrain.data.remote import URL, Location, RemoteSettings

if TYPE_CHECKING:
    import av

HEADER_BYTES = 1 << 16
"""First ranged read of a remote image: enough for the header of nearly every file."""
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
"""Largest width x height decoded (8000x6000 photos and 8K UHD frames fit; 12000x12000 not)."""
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FFMPEG_MAX_PIXELS = 2**31 - 1
"""Largest value of FFmpeg's max_pixels decoder option (its own default)."""
DECODER_SLACK_PIXELS = 1 << 18
"""Headroom of the decoder's limit over twice ours: FFmpeg counts padded, aligned buffers
(a 64x48 mpeg4 stream needs a limit of 89600)."""


def load_image(
    path: Location,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    settings: RemoteSettings = remote.DEFAULT_SETTINGS,
    exif_transpose: bool = False,
) -> Image.Image:
    """Open `path` (a local file or a URL) fully and convert it to RGB; `exif_transpose`:
    turn it upright as its EXIF orientation says (off, as the reference: the stored pixels).

    Raises:
        RecordError: missing_image if the file does not exist, corrupt_image if it cannot be
            decoded completely or has more than `max_pixels` pixels, read_error if a remote
            read kept failing.
    """
    if isinstance(path, URL):
        return _decode_image(io.BytesIO(_remote_image_bytes(path, max_pixels, settings)),
                             path, max_pixels, exif_transpose)  # fmt: skip
    if not path.is_file():
        raise RecordError("missing_image", f"no image file {path}")
    return _decode_image(path, path, max_pixels, exif_transpose)


@contextlib.contextmanager
def _our_pixel_limit() -> Iterator[None]:
    """Pillow's own decompression-bomb check off while a header is read: data.max_image_pixels,
    checked right after from the same header, is the one limit. Pillow's (179 MP; it raises
    above twice that) would refuse as corrupt_image images our limit allows, and would refuse
    those ours refuses without saying which limit. Pillow reads MAX_IMAGE_PIXELS at each open,
    and a loader process decodes one image at a time, so the change is scoped to this call."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _open_image(source: Path | IO[bytes]) -> Image.Image:
    """Image.open under our pixel limit only (the size comes from the header; nothing is
    decoded yet)."""
    with _our_pixel_limit():
        return Image.open(source)


def _decode_image(
    source: Path | IO[bytes], name: Location, max_pixels: int, exif_transpose: bool = False
) -> Image.Image:
    """Header, pixel limit, then the full decode to RGB (`name` for messages).

    16-bit greyscale (mode I;16) converts as Pillow converts it: values are clipped at 255,
    not scaled, so such an image comes out nearly white (as in the reference).
    """
    try:
        with _open_image(source) as image:
            check_pixels(name, *image.size, max_pixels)
            image.load()
            # the decoded size, not the header's claim, is what gets converted and tiled
            check_pixels(name, *image.size, max_pixels)
            upright = ImageOps.exif_transpose(image) if exif_transpose else image
            return upright.convert("RGB")
    except RecordError:
        raise
    except (OSError, ValueError, SyntaxError) as err:
        raise RecordError("corrupt_image", f"{name}: {err}") from err


def check_under_root(path: Location, root: Location) -> None:
    """Refuse a media path that leaves its dataset root (data.media_under_root).

    Local paths are compared after symlinks are resolved (a link inside the root that points
    out of it leaves it); URLs (whose ".." segments the join already resolved) must start with
    the root's prefix.

    Raises:
        RecordError: media_outside_root, naming the path and the root.
    """
    if isinstance(root, URL) or isinstance(path, URL):
        prefix = str(root).rstrip("/") + "/"
        inside = isinstance(root, URL) and isinstance(path, URL) and path.startswith(prefix)
    else:
        inside = Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    if not inside:
        raise RecordError("media_outside_root", f"{path} is outside the dataset root {root}")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header in `data` (a prefix of the file), None if cut short."""
    try:
        with _open_image(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError, SyntaxError, EOFError):
        return None


def _remote_header(
    url: URL, size: int, settings: RemoteSettings
) -> tuple[bytes, tuple[int, int] | None]:
    """A prefix of the object read from its start (HEADER_BYTES, doubled until Pillow reads a
    header from it), and the (width, height) found there (None: not an image Pillow knows)."""
    data = remote.read_range(url, 0, min(HEADER_BYTES, size), settings)
    found = _header_size(data)
    while found is None and len(data) < size:
        data += remote.read_range(url, len(data), min(2 * len(data), size), settings)
        found = _header_size(data)
    return data, found


def image_size(
    path: Location, settings: RemoteSettings = remote.DEFAULT_SETTINGS
) -> tuple[int, int]:
    """(width, height) from the header alone (a ranged read for a URL).

    Raises:
        RecordError: as load_image, corrupt_image when no header can be read.
    """
    if not isinstance(path, URL):
        if not path.is_file():
            raise RecordError("missing_image", f"no image file {path}")
        try:
            with _open_image(path) as image:
                return image.size
        except (OSError, ValueError, SyntaxError) as err:
            raise RecordError("corrupt_image", f"{path}: {err}") from err
    try:
        info = remote.object_info(path, settings)
        found = _remote_header(path, info.size, settings)[1]
    except remote.ObjectMissingError as err:
        raise RecordError("missing_image", f"no image object {path}") from err
    except remote.RemoteReadError as err:
        raise RecordError("read_error", str(err)) from err
    if found is None:
        raise RecordError("corrupt_image", f"{path}: no image header Pillow can read")
    return found


def _remote_image_bytes(url: URL, max_pixels: int, settings: RemoteSettings) -> bytes:
    """The bytes of an image object, fetched only once its header passed the pixel limit."""
    try:
        info = remote.object_info(url, settings)
        if info.is_dir:
            raise RecordError("missing_image", f"{url} is a prefix (folder), not an image")
        data, found = _remote_header(url, info.size, settings)
        if found is not None:
            check_pixels(url, *found, max_pixels)
        # a file Pillow cannot read a header from even whole: _decode_image says corrupt_image
        return data + remote.read_range(url, len(data), info.size, settings)
    except remote.ObjectMissingError as err:
        raise RecordError("missing_image", f"no image object {url}") from err
    except remote.RemoteReadError as err:
        raise RecordError("read_error", str(err)) from err


def check_pixels(path: Location, width: int, height: int, max_pixels: int) -> None:
    """Raise RecordError('image_too_large') when width x height exceeds `max_pixels`."""
    if width * height > max_pixels:
        raise RecordError(
            "image_too_large",
            f"{path}: {width}x{height} = {width * height} pixels exceeds "
            f"data.max_image_pixels = {max_pixels}",
        )


def sample_frame_indices(num_frames: int, num_wanted: int, rng: np.random.Generator) -> list[int]:
    """The reference's 'rand' sampling: one random frame per equal interval of [0, n).

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


def _frame_key(path: PurePath | URL) -> tuple[int, str]:
    name = PurePath(path.name)
    match = re.search(r"(\d+)$", name.stem)
    return (int(match.group(1)) if match else -1, name.name)


def _is_frame(path: PurePath | URL) -> bool:
    return PurePath(path.name).suffix.lower() in FRAME_SUFFIXES


def _folder_frames(
    folder: Location,
    num_wanted: int,
    rng: np.random.Generator,
    max_pixels: int,
    settings: RemoteSettings,
) -> list[Image.Image]:
    listing = remote.list_files(folder, settings) if isinstance(folder, URL) else folder.iterdir()
    files: list[Location] = sorted((p for p in listing if _is_frame(p)), key=_frame_key)
    if not files:
        raise RecordError("video_error", f"frame folder {folder} has no image files")
    if len(files) > num_wanted:
        files = [files[i] for i in sample_frame_indices(len(files), num_wanted, rng)]
    try:
        return [load_image(p, max_pixels, settings) for p in files]
    except RecordError as err:
        kept = ("image_too_large", "read_error")
        reason = err.reason if err.reason in kept else "video_error"
        raise RecordError(reason, f"frame folder {folder}: {err.detail}") from err


def _clip_window(num_frames: int, fps: float, clip: tuple[float, float] | None) -> range:
    """Frame indices inside `clip` (all frames if None)."""
    if clip is None:
        return range(num_frames)
    # clamped while still floats: a finite clip of 1e308 s times the fps is inf, and int(inf)
    # raises OverflowError
    start = int(min(clip[0] * fps, num_frames))
    stop = min(num_frames, start + int(min((clip[1] - clip[0]) * fps, num_frames)))
    return range(start, stop)


def _decode_frames(
    path: Location,
    data: bytes | None,
    num_wanted: int,
    rng: np.random.Generator,
    clip: tuple[float, float] | None,
    max_pixels: int,
) -> list[Image.Image]:
    """Frames of the video file `path`, or of its bytes `data` (read from a URL) if given."""
    with _open_video(path, data) as container:
        stream = container.streams.video[0]
        check_pixels(path, stream.codec_context.width, stream.codec_context.height, max_pixels)
        fps = float(stream.average_rate or stream.guessed_rate or 1)
        num_frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
    window = _clip_window(num_frames, fps, clip)
    if len(window) == 0:
        raise RecordError("video_error", f"{path}: no frames in clip {clip} ({num_frames} frames)")
    wanted = [window[i] for i in sample_frame_indices(len(window), num_wanted, rng)]
    with _open_video(path, data) as container:
        decoded = _decode_wanted(container, path, set(wanted), max_pixels)
    if not decoded:
        raise RecordError("video_error", f"{path}: could not decode any requested frame")
    last = decoded[max(decoded)]  # the header over-counted: reuse the last decoded frame
    return [decoded.get(i, last) for i in wanted]


def _decode_wanted(
    container: Any, path: Location, targets: set[int], max_pixels: int
) -> dict[int, Image.Image]:
    """The frames at positions `targets`, each one's size checked as it comes out of the
    decoder, before it is converted: the stream header is only a claim, and a stream whose
    header says 64x48 may carry 12000x12000 frames (5-7 GB of RSS to decode and convert)."""
    stream = container.streams.video[0]
    # FFmpeg's own max_pixels makes the decoder refuse to allocate far larger frames, so a
    # lying stream costs at most one frame of about twice our cap; it counts padded buffers,
    # hence the headroom, and our exact check on each frame follows
    limit = min(2 * max_pixels + DECODER_SLACK_PIXELS, FFMPEG_MAX_PIXELS)
    stream.codec_context.options = {"max_pixels": str(limit)}
    decoded: dict[int, Image.Image] = {}
    try:
        for position, frame in enumerate(container.decode(stream)):
            check_pixels(path, frame.width, frame.height, max_pixels)
            if position in targets:
                decoded[position] = frame.to_image().convert("RGB")
            if position >= max(targets):
                break
    except (MemoryError, ValueError) as err:  # av.error's ENOMEM / EINVAL subclass these
        if not _decoder_refused_size(err, stream.codec_context, max_pixels):
            raise
        raise RecordError(
            "image_too_large",
            f"{path}: a frame larger than the stream header's size exceeds "
            f"data.max_image_pixels = {max_pixels} (the decoder refused it: {err})",
        ) from err
    return decoded


def _decoder_refused_size(err: Exception, context: Any, max_pixels: int) -> bool:
    """True when FFmpeg's max_pixels refused a frame: an EINVAL that reset the size to 0x0
    (its size check) or an ENOMEM with a size above the cap (its buffer allocation). Python's
    own MemoryError has no errno: the host is out of memory, and that is not the record's."""
    code = getattr(err, "errno", None)
    area = context.width * context.height
    return code in (errno.EINVAL, errno.ENOMEM) and (area == 0 or area > max_pixels)


def _open_video(path: Location, data: bytes | None) -> av.container.InputContainer:
    pyav = packages.require("av", f"decoding the video {path}", "av")
    return pyav.open(io.BytesIO(data) if data is not None else str(path), mode="r")


def _decoding_errors() -> tuple[type[BaseException], ...]:
    """What a damaged video raises: PyAV's own errors once PyAV was imported to decode it."""
    pyav = sys.modules.get("av")
    return (OSError, ValueError, IndexError) + ((pyav.FFmpegError,) if pyav else ())


def load_video_frames(
    path: Location,
    min_num_frame: int,
    max_num_frame: int,
    rng: np.random.Generator,
    clip: tuple[float, float] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    settings: RemoteSettings = remote.DEFAULT_SETTINGS,
) -> list[Image.Image]:
    """K frames (K drawn in [min_num_frame, max_num_frame]) of a video file or frame folder
    (local, or a URL: an object, or a prefix holding frames).

    Deterministic given the state of `rng`. Raises RecordError('video_error', ...) on failure,
    RecordError('image_too_large', ...) for frames of more than `max_pixels` pixels,
    RecordError('read_error', ...) when a remote read kept failing.
    """
    num_wanted = draw_num_frames(min_num_frame, max_num_frame, rng)
    data = None
    try:
        if isinstance(path, URL):
            info = remote.object_info(path, settings)
            if info.is_dir:
                return _folder_frames(path, num_wanted, rng, max_pixels, settings)
            data = remote.read_all(path, info.size, settings)
        elif path.is_dir():
            return _folder_frames(path, num_wanted, rng, max_pixels, settings)
        elif not path.is_file():
            raise RecordError("video_error", f"no video file or frame folder {path}")
        return _decode_frames(path, data, num_wanted, rng, clip, max_pixels)
    except RecordError:
        raise
    except remote.ObjectMissingError as err:
        raise RecordError("video_error", f"no video object or frame prefix {path}") from err
    except remote.RemoteReadError as err:
        raise RecordError("read_error", str(err)) from err
    except _decoding_errors() as err:
        raise RecordError("video_error", f"{path}: {err}") from err
