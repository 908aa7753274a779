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

Every file is read through its Location (data.location), the same way for a local path and
a URL: an image's header first (a prefix of HEADER_BYTES, doubled until Pillow can read the
size), so the pixel limit applies before the rest is read and decoded; a video through a
buffer of VIDEO_BUFFER_BYTES (for an object, one ranged request per buffer: a clip up to that
size is one request); a folder or URL prefix stands for a frame folder. A missing file or
object is missing_image / video_error, a remote read that keeps failing is read_error; both
name the file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import re
import sys
from collections.abc import Iterator
from pathlib import PurePath
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlpretrain import packages
from vlpretrain.data.location import Location, LocationStream, PathLike, RemoteReadError
from vlpretrain.data.records import RecordError

if TYPE_CHECKING:
    import av

HEADER_BYTES = 1 << 16
"""First ranged read of an image: enough for the header of nearly every file."""
VIDEO_BUFFER_BYTES = 1 << 23
"""Read buffer of a video (PyAV reads through it): one ranged request per buffer remotely."""
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
"""Largest width x height decoded (8000x6000 photos and 8K UHD frames fit; 12000x12000 not)."""
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FFMPEG_MAX_PIXELS = 2**31 - 1
"""Largest value of FFmpeg's max_pixels decoder option (its own default)."""
DECODER_SLACK_PIXELS = 1 << 18
"""Headroom of the decoder's limit over twice ours: FFmpeg counts padded, aligned buffers
(a 64x48 mpeg4 stream needs a limit of 89600)."""


def load_image(
    path: PathLike,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    exif_transpose: bool = False,
) -> Image.Image:
    """Open `path` (a local file or a URL) fully and convert it to RGB; `exif_transpose`:
    turn it upright as its EXIF orientation says (off, as the reference: the stored pixels).

    Raises:
        RecordError: missing_image if the file does not exist, corrupt_image if it cannot be
            decoded completely or has more than `max_pixels` pixels, read_error if a remote
            read kept failing.
    """
    location = Location.parse(path)
    with _opened_image(location) as stream:
        data, found = _read_header(stream)
        if found is not None:
            check_pixels(location, *found, max_pixels)
        # a file Pillow cannot read a header from even whole: _decode_image says corrupt_image
        data += stream.read_range(len(data), stream.size - len(data))
    return _decode_image(io.BytesIO(data), location, max_pixels, exif_transpose)


@contextlib.contextmanager
def _opened_image(location: Location) -> Iterator[LocationStream]:
    """The stream of the image `location`; what fails while it is open or read becomes the
    RecordError naming it (a local read error is corrupt_image, as when Pillow read it)."""
    try:
        with location.open() as stream:
            yield stream
    except FileNotFoundError as err:
        raise RecordError("missing_image", f"no image {location.noun} {location}") from err
    except IsADirectoryError as err:
        detail = f"{location} is a {location.folder_noun}, not an image"
        raise RecordError("missing_image", detail) from err
    except RemoteReadError as err:
        raise RecordError("read_error", str(err)) from err
    except OSError as err:
        raise RecordError("corrupt_image", f"{location}: {err}") from err


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


def _open_image(source: IO[bytes]) -> Image.Image:
    """Image.open under our pixel limit only (the size comes from the header; nothing is
    decoded yet)."""
    with _our_pixel_limit():
        return Image.open(source)


def _decode_image(
    source: IO[bytes], name: Location, max_pixels: int, exif_transpose: bool = False
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
    except UnidentifiedImageError as err:
        # Pillow's message names the stream it was given (an object address for bytes read
        # into memory): the same file must give the same detail in every run.
        raise RecordError("corrupt_image", f"{name}: not an image Pillow can read") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise RecordError("corrupt_image", f"{name}: {err}") from err


def check_under_root(path: Location, root: Location) -> None:
    """Refuse a media path that leaves its dataset root (data.media_under_root; see
    Location.is_under).

    Raises:
        RecordError: media_outside_root, naming the path and the root.
    """
    if not path.is_under(root):
        raise RecordError("media_outside_root", f"{path} is outside the dataset root {root}")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header in `data` (a prefix of the file), None if cut short."""
    try:
        with _open_image(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError, SyntaxError, EOFError):
        return None


def _read_header(stream: LocationStream) -> tuple[bytes, tuple[int, int] | None]:
    """A prefix of the file read from its start (HEADER_BYTES, doubled until Pillow reads a
    header from it), and the (width, height) found there (None: not an image Pillow knows)."""
    size = stream.size
    data = stream.read_range(0, min(HEADER_BYTES, size))
    found = _header_size(data)
    while found is None and len(data) < size:
        data += stream.read_range(len(data), min(2 * len(data), size) - len(data))
        found = _header_size(data)
    return data, found


def image_size(path: PathLike) -> tuple[int, int]:
    """(width, height) from the header alone (read by range).

    Raises:
        RecordError: as load_image, corrupt_image when no header can be read.
    """
    location = Location.parse(path)
    with _opened_image(location) as stream:
        found = _read_header(stream)[1]
    if found is None:
        raise RecordError("corrupt_image", f"{location}: no image header Pillow can read")
    return found


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


def _frame_key(path: Location) -> tuple[int, str]:
    name = PurePath(path.name)
    match = re.search(r"(\d+)$", name.stem)
    return (int(match.group(1)) if match else -1, name.name)


def _is_frame(path: Location) -> bool:
    return PurePath(path.name).suffix.lower() in FRAME_SUFFIXES


def _folder_frames(
    folder: Location,
    num_wanted: int,
    rng: np.random.Generator,
    max_pixels: int,
) -> list[Image.Image]:
    files = sorted((p for p in folder.list_files() if _is_frame(p)), key=_frame_key)
    if not files:
        raise RecordError("video_error", f"frame folder {folder} has no image files")
    if len(files) > num_wanted:
        files = [files[i] for i in sample_frame_indices(len(files), num_wanted, rng)]
    try:
        return [load_image(p, max_pixels) for p in files]
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
    num_wanted: int,
    rng: np.random.Generator,
    clip: tuple[float, float] | None,
    max_pixels: int,
) -> list[Image.Image]:
    """Frames of the video file or object `path`."""
    with path.open() as raw, io.BufferedReader(raw, VIDEO_BUFFER_BYTES) as source:
        return _decode_source(source, path, num_wanted, rng, clip, max_pixels)


def _decode_source(
    source: IO[bytes],
    path: Location,
    num_wanted: int,
    rng: np.random.Generator,
    clip: tuple[float, float] | None,
    max_pixels: int,
) -> list[Image.Image]:
    """Frames of the video in `source`: a pass that counts them, then one that decodes."""
    with _open_video(source, path) as container:
        stream = container.streams.video[0]
        check_pixels(path, stream.codec_context.width, stream.codec_context.height, max_pixels)
        fps = float(stream.average_rate or stream.guessed_rate or 1)
        num_frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
    window = _clip_window(num_frames, fps, clip)
    if len(window) == 0:
        raise RecordError("video_error", f"{path}: no frames in clip {clip} ({num_frames} frames)")
    wanted = [window[i] for i in sample_frame_indices(len(window), num_wanted, rng)]
    source.seek(0)
    with _open_video(source, path) as container:
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


def _open_video(source: IO[bytes], path: Location) -> av.container.InputContainer:
    pyav = packages.require("av", f"decoding the video {path}", "av")
    return pyav.open(source, mode="r")


def _decoding_errors() -> tuple[type[BaseException], ...]:
    """What a damaged video raises: PyAV's own errors once PyAV was imported to decode it."""
    pyav = sys.modules.get("av")
    return (OSError, ValueError, IndexError) + ((pyav.FFmpegError,) if pyav else ())


def load_video_frames(
    path: PathLike,
    min_num_frame: int,
    max_num_frame: int,
    rng: np.random.Generator,
    clip: tuple[float, float] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[Image.Image]:
    """K frames (K drawn in [min_num_frame, max_num_frame]) of a video file or frame folder
    (local, or a URL: an object, or a prefix holding frames).

    Deterministic given the state of `rng`. Raises RecordError('video_error', ...) on failure,
    RecordError('image_too_large', ...) for frames of more than `max_pixels` pixels,
    RecordError('read_error', ...) when a remote read kept failing.
    """
    location = Location.parse(path)
    num_wanted = draw_num_frames(min_num_frame, max_num_frame, rng)
    try:
        if location.info().is_dir:
            return _folder_frames(location, num_wanted, rng, max_pixels)
        return _decode_frames(location, num_wanted, rng, clip, max_pixels)
    except RecordError:
        raise
    except FileNotFoundError as err:
        where = f"{location.noun} or frame {location.folder_noun} {location}"
        raise RecordError("video_error", f"no video {where}") from err
    except RemoteReadError as err:
        raise RecordError("read_error", str(err)) from err
    except _decoding_errors() as err:
        raise RecordError("video_error", f"{location}: {err}") from err
