"""Build one training sample from one annotation record of one dataset.

    DatasetSource.load(record_index, epoch, seed)
      record_index --repeat_time--> line --index--> bytes --records--> Record
      Record --media + tiling--> tiles --templates--> input_ids, labels
      -> TokenizedSample | SkippedSample                   (data/samples.py)

Tile side, tokens per tile and template come from RunFacts (the model's), never from
SampleConfig. A sample is a pure function of (seed, epoch, dataset_index, record_index): all
randomness comes from np.random.default_rng((seed, epoch, dataset_index, record_index)).

repeat_time r > 0: effective length int(N * r). Record indices [0, int(r) * N) are int(r)
full copies of the file; the remaining int(N * r) - int(r) * N indices are a random subset of
lines without replacement, drawn afresh per (seed, epoch) (the reference keeps the head of the
file for r < 1 and drops the fraction for r > 1).
"""

from __future__ import annotations

import errno
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from vlpretrain.data import media, remote, tiling
from vlpretrain.data.index import AnnotationIndex
from vlpretrain.data.location import Location, PathLike
from vlpretrain.data.meta import DatasetSpec, load_meta, problems_error
from vlpretrain.data.records import Record, RecordError, parse_record
from vlpretrain.data.samples import SampleSource, SkippedSample, TokenizedSample
from vlpretrain.data.templates import (
    TemplateRenderer,
    Turns,
    check_media_tags,
    check_reserved_strings,
    check_turn_order,
    expand_image_placeholders,
    expand_video_tag,
    get_template,
    insert_image_tag,
)
from vlpretrain.data.tiling import NormalizeType
from vlpretrain.facts import RunFacts

logger = logging.getLogger(__name__)

_REPEAT_SALT = 0x5EED
"""Extra seed word that separates the repeat_time subset from the per-sample streams."""


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """How records become samples (reference flags in brackets)."""

    max_seq_length: int = 8192
    """Max tokens of one sample; longer ones are truncated or skipped [--max_seq_length]."""
    dynamic_image_size: bool = True
    """Dynamic tiling of images [--dynamic_image_size]."""
    use_thumbnail: bool = True
    """Append a thumbnail tile when an image has more than one tile [--use_thumbnail]."""
    min_dynamic_patch: int = 1
    """Minimum tiles per image [--min_dynamic_patch]."""
    max_dynamic_patch: int = 12
    """Maximum tiles per sample; the meta file may override it per dataset."""
    min_num_frame: int = 8
    """Minimum frames sampled from a video [--min_num_frame]."""
    max_num_frame: int = 32
    """Maximum frames sampled from a video [--max_num_frame]."""
    normalize_type: NormalizeType = "imagenet"
    """Pixel mean/std: imagenet, clip or siglip [--normalize_type]."""
    pad2square: bool = False
    """Pad non-tiled images to a square with the mean colour (no augmentation only)."""
    max_skip_fraction: float = 0.01
    """Fail when more than this fraction of the records seen were skipped."""
    log_per_dataset: bool = True
    """Log each dataset's loss (`loss/<dataset name>`) with every logged step, summed per
    dataset in the same pass as the loss and read with it in the step's one device read."""
    max_image_pixels: int = media.DEFAULT_MAX_IMAGE_PIXELS
    """Images and video frames with more pixels (width x height) are skipped as
    image_too_large: checked from the file header before decoding and again on every decoded
    frame (a video's header may lie); the one limit, Pillow's own 179 MP one does not apply.
    50 MP decodes in about a second."""
    max_record_bytes: int | None = None
    """Annotation lines longer than this are skipped as too_long before they are parsed or
    tokenised; None: RECORD_BYTES_PER_TOKEN (32) bytes per token of max_seq_length."""
    cache_dir: str | None = None
    """Annotation index cache (local and remote annotations); None -> $VLPRETRAIN_CACHE/index
    or ~/.cache/vlpretrain/index."""
    remote_timeout_seconds: float = remote.DEFAULT_TIMEOUT_SECONDS
    """Bound on one request to object storage (meta, annotation or media URL: s3://, gs://,
    https://); a stalled read fails after this long instead of hanging the loader."""
    remote_retries: int = remote.DEFAULT_RETRIES
    """Retries of a failed object-storage request (doubling back-off from 0.25 s); after the
    last one the record is skipped as read_error, naming the URL."""
    media_under_root: bool = False
    """Skip as media_outside_root a record whose media path resolves (after symlinks) outside
    its dataset's root ('../', absolute paths, links out); False lets paths leave the root,
    as the reference does."""
    exif_transpose: bool = False
    """Turn images upright as their EXIF orientation tag says before tiling; False tiles the
    stored pixels, ignoring the tag, as the reference does."""
    on_changed_media: Literal["error", "skip"] = "error"
    """On resume, a record held in the saved packer buffer that no longer loads as it did
    (media changed or gone): 'error' stops with the record named; 'skip' drops it, counted and
    listed in skipped.jsonl as media_changed (settable on resume)."""

    def __post_init__(self) -> None:
        if self.normalize_type not in tiling.NORMALIZE_STATS:
            raise ValueError(f"normalize_type {self.normalize_type!r} not in imagenet/clip/siglip")
        for name in ("max_seq_length", "min_dynamic_patch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_dynamic_patch < self.min_dynamic_patch:
            raise ValueError("max_dynamic_patch must be >= min_dynamic_patch")
        if not 1 <= self.min_num_frame <= self.max_num_frame:
            raise ValueError("need 1 <= min_num_frame <= max_num_frame")
        for name in ("max_image_pixels", "max_record_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.remote_timeout_seconds > 0:
            raise ValueError(
                f"remote_timeout_seconds must be > 0, got {self.remote_timeout_seconds}"
            )
        if self.remote_retries < 0:
            raise ValueError(f"remote_retries must be >= 0, got {self.remote_retries}")
        if self.on_changed_media not in ("error", "skip"):
            raise ValueError(
                f"on_changed_media must be 'error' or 'skip', got {self.on_changed_media!r}"
            )
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")

    def remote_settings(self) -> remote.RemoteSettings:
        """Timeout and retries of object-storage reads."""
        return remote.RemoteSettings(self.remote_timeout_seconds, self.remote_retries)

    def image_settings(self) -> dict[str, Any]:
        """The tiling settings a trained model records in its config.json (chat reuses them)."""
        return {
            "dynamic_image_size": self.dynamic_image_size,
            "use_thumbnail": self.use_thumbnail,
            "min_dynamic_patch": self.min_dynamic_patch,
            "max_dynamic_patch": self.max_dynamic_patch,
            "pad2square": self.pad2square,
            "normalize_type": self.normalize_type,
        }


RECORD_BYTES_PER_TOKEN = 32
"""Default byte cap per token of max_seq_length: above JSON-escaped CJK (~9 bytes a token)."""


def record_byte_limit(config: SampleConfig) -> int:
    """Bytes an annotation line may hold (SampleConfig.max_record_bytes or its default)."""
    if config.max_record_bytes is not None:
        return config.max_record_bytes
    return RECORD_BYTES_PER_TOKEN * config.max_seq_length


MAX_DATASET_RECORDS = 1 << 28
"""Most records a dataset may have after repeat_time: each loader stream shuffles the records
of an epoch as an int64 permutation (2 GiB at this limit)."""


def repeat_length(num_lines: int, repeat_time: float) -> int:
    """Effective number of records of a dataset: int(N * r)."""
    return int(num_lines * repeat_time)


def repeat_line_index(
    record_index: int, num_lines: int, repeat_time: float, subset: np.ndarray
) -> int:
    """Line of `record_index`: full copies first, then `subset` (the fractional part)."""
    full = int(repeat_time) * num_lines
    if record_index < full:
        return record_index % num_lines
    return int(subset[record_index - full])


MACHINE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EROFS}
)
"""OSError numbers that say the machine, not the record, failed: the disk or quota is full,
the process is out of file handles or memory."""
DETAIL_CHARS = 300
"""Longest exception message kept in an unexpected_error skip (a record can be 256 KiB)."""


def machine_failure(err: BaseException) -> BaseException | None:
    """The failure behind `err` that must stop the run, None when `err` is about the record.

    MemoryError stops the run: the byte and pixel caps bound what one record may cost, so
    running out of memory says the host (or the caps) are wrong, and skipping would file
    every following record under a reason that is not theirs. So does an ImportError (a
    package the work needs is not installed: the installation's fault), and an OSError of
    MACHINE_ERRNOS, also behind a RecordError that filed it under a media reason (`media`
    turns any OSError of an image into corrupt_image). KeyboardInterrupt and SystemExit are
    not Exceptions and are never caught.
    """
    if isinstance(err, MemoryError | ImportError):  # ImportError: packages.MissingPackageError
        return err
    for candidate in (err, err.__cause__):
        if isinstance(candidate, OSError) and candidate.errno in MACHINE_ERRNOS:
            return candidate
    return None


def unexpected_detail(err: Exception) -> str:
    """`Type: message (at file.py:line)` of an exception no check foresaw."""
    message = str(err)
    if len(message) > DETAIL_CHARS:
        message = message[:DETAIL_CHARS] + "..."
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {message}{where}"


class DatasetSource:
    """The samples of one meta dataset; picklable, opens its files lazily per process."""

    def __init__(
        self,
        spec: DatasetSpec,
        config: SampleConfig,
        facts: RunFacts,
        tokenizer: Any,
        index: AnnotationIndex | None = None,
    ) -> None:
        self.spec = spec
        self.config = config
        self.facts = facts
        self.renderer = TemplateRenderer(get_template(facts.template), tokenizer)
        self.remote = config.remote_settings()
        # media joined to the root are read with this run's remote settings
        self.root = Location.parse(spec.root, settings=self.remote)
        self.index = index or AnnotationIndex(spec.annotation, config.cache_dir, self.remote)
        self._subset_key: tuple[int, int] | None = None
        self._subset = np.zeros(0, dtype=np.int64)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dataset_index(self) -> int:
        return self.spec.dataset_index

    def max_patches(self) -> int:
        """Tiles before the thumbnail of a one-image sample: the meta file's per-dataset
        max_dynamic_patch when it sets one, else data.max_dynamic_patch."""
        return self.spec.max_dynamic_patch or self.config.max_dynamic_patch

    def describe_tile_budget(self) -> str:
        """One line: the most tiles (and image tokens) an image of this dataset becomes, and
        where the cap comes from (the meta file's value silently wins over the run's)."""
        cfg, patches = self.config, self.max_patches()
        where = f"dataset {self.name!r}"
        if not cfg.dynamic_image_size:
            return f"{where}: 1 tile per image (data.dynamic_image_size = false)"
        origin = "data.max_dynamic_patch"
        if self.spec.max_dynamic_patch:
            origin = "the meta file's max_dynamic_patch"
            if patches != cfg.max_dynamic_patch:
                origin += f", which overrides data.max_dynamic_patch {cfg.max_dynamic_patch}"
        thumbnail = cfg.use_thumbnail and patches > 1  # a single tile is its own thumbnail
        tiles = patches + int(thumbnail)
        plus = " + 1 thumbnail" if thumbnail else ""
        return (
            f"{where}: up to {tiles} tiles per image = {patches} patches ({origin}){plus}; "
            f"{tiles * self.facts.num_image_token} image tokens; a sample of n images: "
            f"max(1, {patches} // n) patches per image{plus and ' (+ 1 thumbnail if > 1)'}"
        )

    @property
    def num_lines(self) -> int:
        """Non-blank lines in the annotation file."""
        return len(self.index)

    def __len__(self) -> int:
        return repeat_length(self.num_lines, self.spec.repeat_time)

    def _fraction_subset(self, epoch: int, seed: int) -> np.ndarray:
        if self._subset_key != (seed, epoch):
            n = self.num_lines
            size = len(self) - int(self.spec.repeat_time) * n
            rng = np.random.default_rng((seed, epoch, self.dataset_index, _REPEAT_SALT))
            picked = rng.choice(n, size=size, replace=False) if size else np.zeros(0, np.int64)
            self._subset = np.sort(picked)
            self._subset_key = (seed, epoch)
        return self._subset

    def line_of(self, record_index: int, epoch: int, seed: int) -> int:
        """Index (into the annotation index) of the line behind `record_index`."""
        if not 0 <= record_index < len(self):
            raise IndexError(f"record {record_index} out of range for {self.name} ({len(self)})")
        subset = self._fraction_subset(epoch, seed)
        return repeat_line_index(record_index, self.num_lines, self.spec.repeat_time, subset)

    def source_of(self, line_index: int) -> SampleSource:
        """File and 1-based line number of an index entry."""
        return SampleSource(
            self.name, str(self.spec.annotation), self.index.line_number(line_index)
        )

    def load(self, record_index: int, epoch: int, seed: int) -> TokenizedSample | SkippedSample:
        """Sample for `record_index` (0 <= record_index < len(self))."""
        line_index = self.line_of(record_index, epoch, seed)
        rng = np.random.default_rng((seed, epoch, self.dataset_index, record_index))
        return self.load_line(line_index, rng)

    def load_line(
        self, line_index: int, rng: np.random.Generator
    ) -> TokenizedSample | SkippedSample:
        """Sample of one annotation line, randomness drawn from `rng`.

        Whatever the line holds, the result is a sample or a SkippedSample naming its file
        and line: a RecordError keeps its reason, any other exception while the line becomes
        a sample is `unexpected_error`. Only what is not about the record propagates (see
        `machine_failure`), and failures to read the annotation file itself (OSError,
        AnnotationChangedError): they concern every record of the dataset.
        """
        source = self.source_of(line_index)
        try:
            line = self.index.read(line_index, record_byte_limit(self.config))
        except RecordError as err:  # too_long, read_error of a remote record
            return SkippedSample(self.dataset_index, source, err.reason, err.detail)
        try:
            return self.build(parse_record(line, self.root), rng, source)
        except Exception as err:  # one record never stops the job; machine failures go on
            failure = machine_failure(err)
            if failure is err:
                raise
            if failure is not None:
                raise failure from err
            return self._skipped(source, err)

    def _skipped(self, source: SampleSource, err: Exception) -> SkippedSample:
        if isinstance(err, RecordError):
            return SkippedSample(self.dataset_index, source, err.reason, err.detail)
        detail = unexpected_detail(err)
        logger.debug("%s: unexpected_error %s", source, detail, exc_info=err)
        return SkippedSample(self.dataset_index, source, "unexpected_error", detail)

    def build(
        self, record: Record, rng: np.random.Generator, source: SampleSource
    ) -> TokenizedSample:
        """Tile the media of `record`, render its template, truncate; raises RecordError."""
        turns = check_turn_order(self.renderer.template, record.conversations)
        check_reserved_strings(turns)
        check_media_tags(record.kind, turns, len(record.images))
        if self.config.media_under_root:
            for path in (*record.images, *([record.video] if record.video else [])):
                media.check_under_root(path, self.root)
        tiles_per_image, tiles, turns = self._media(record, turns, rng)
        turns = expand_image_placeholders(
            turns, [self.facts.num_image_token * n for n in tiles_per_image]
        )
        input_ids, labels = self.renderer.join(self.renderer.render_segments(turns))
        input_ids, labels = self.renderer.truncate(input_ids, labels, self.config.max_seq_length)
        size = self.facts.tile_size
        pixels = tiling.tile_pixels(tiles, size)  # normalised on the device (tiling)
        return TokenizedSample(
            input_ids=input_ids,
            labels=labels,
            pixel_values=pixels,
            num_tiles_per_image=tuple(tiles_per_image),
            dataset_index=self.dataset_index,
            source=source,
        )

    def _media(
        self, record: Record, turns: Turns, rng: np.random.Generator
    ) -> tuple[list[int], list[Image.Image], Turns]:
        """Tiles per image, all tiles in order, and turns with <video> expanded."""
        cfg = self.config
        if record.kind == "text":
            return [], [], turns
        if record.kind == "video":
            assert record.video is not None
            frames = media.load_video_frames(
                record.video,
                cfg.min_num_frame,
                cfg.max_num_frame,
                rng,
                record.clip,
                max_pixels=cfg.max_image_pixels,
            )
            tiles = [t for frame in frames for t in self._tiles(frame, 1, False, rng)]
            return [1] * len(frames), tiles, expand_video_tag(turns, len(frames))
        max_patch = self.max_patches()
        if record.kind == "image":
            turns = insert_image_tag(turns)
        else:
            max_patch = tiling.image_tile_budget(max_patch, len(record.images))
        images = [
            media.load_image(p, cfg.max_image_pixels, cfg.exif_transpose) for p in record.images
        ]
        per_image = [self._tiles(img, max_patch, cfg.dynamic_image_size, rng) for img in images]
        return [len(t) for t in per_image], [t for ts in per_image for t in ts], turns

    def _tiles(
        self, image: Image.Image, max_num: int, dynamic: bool, rng: np.random.Generator
    ) -> list[Image.Image]:
        cfg = self.config
        return tiling.make_tiles(
            image,
            dynamic=dynamic,
            min_num=min(cfg.min_dynamic_patch, max_num),
            max_num=max_num,
            tile_size=self.facts.tile_size,
            use_thumbnail=cfg.use_thumbnail,
            pad2square=cfg.pad2square,
            normalize_type=cfg.normalize_type,
            augment_rng=rng if self.spec.data_augment else None,
        )


def build_sources(
    meta_path: PathLike, config: SampleConfig, facts: RunFacts, tokenizer: Any
) -> list[DatasetSource]:
    """One DatasetSource per meta dataset, in meta order (indexes are built or loaded here).

    Raises:
        ValueError: listing every problem of the meta file, or every dataset whose
            repeat_time leaves no record.
    """
    specs = load_meta(meta_path, config.remote_settings())
    sources = [DatasetSource(spec, config, facts, tokenizer) for spec in specs]
    problems = [p for s in sources if (p := repeat_problem(s.spec, s.num_lines)) is not None]
    if problems:
        raise problems_error(Location.parse(meta_path), problems)
    return sources


def repeat_problem(spec: DatasetSpec, num_lines: int) -> str | None:
    """Why `spec`'s repeat_time over its `num_lines` lines gives no usable length, or None."""
    records = repeat_length(num_lines, spec.repeat_time)
    where = f"dataset {spec.name!r}: field 'repeat_time' {spec.repeat_time} x {num_lines} lines"
    if records == 0:
        return (
            f"{where} of {spec.annotation} leaves int({num_lines} * {spec.repeat_time}) = 0 records"
        )
    if records > MAX_DATASET_RECORDS:
        gibibytes = 8 * MAX_DATASET_RECORDS / 2**30
        return (
            f"{where} of {spec.annotation} gives {records} records, above the limit of "
            f"{MAX_DATASET_RECORDS} per dataset (every loader stream shuffles them in memory, "
            f"8 bytes each: {gibibytes:.0f} GiB at the limit); use repeat_time <= "
            f"{MAX_DATASET_RECORDS / num_lines:.10g}"
        )
    return None
