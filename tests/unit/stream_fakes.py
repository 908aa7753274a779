"""Small deterministic sample sources for the data-stream tests (no files, no tokenizer)."""

from __future__ import annotations

import numpy as np

from vlpretrain.data.samples import IGNORE_INDEX, SampleSource, SkippedSample, TokenizedSample
from vlpretrain.facts import RunFacts
from vlpretrain.train.flops import ComponentShape, FlopsCounter

IMG_START, IMG_END, IMG_CONTEXT = 5, 6, 7
TOKENS_PER_TILE = 4
TILE_SIZE = 2
FACTS = RunFacts(
    tile_size=TILE_SIZE,
    num_image_token=TOKENS_PER_TILE,
    template="internvl2_5",
    pad_token_id=0,
    img_start_token_id=IMG_START,
    img_end_token_id=IMG_END,
    img_context_token_id=IMG_CONTEXT,
)
"""The run facts matching these fake samples."""

# For packing.balance_flops: a tile costs far more than its tokens (a big ViT beside a small
# LLM, as in InternVL2.5-1B), and attention is large enough that long samples cost more per
# token than short ones.
COUNTER = FlopsCounter(
    vision=ComponentShape(400, 1.0, True, 2, 8),
    projector=ComponentShape(20, 1.0, True),
    llm=ComponentShape(100, 1.0, True, 2, 2),
    head=ComponentShape(30, 1.0, True),
    vision_tokens_per_tile=5,
    image_tokens_per_tile=4,
)
"""The model FLOPs counter the balanced-packing tests price samples with."""


def make_sample(
    dataset_index: int,
    tiles_per_image: tuple[int, ...],
    num_text: int,
    *,
    line: int = 1,
    seed: int = 0,
    num_prompt: int = 2,
    interleaved: bool = False,
) -> TokenizedSample:
    """`num_prompt` untrained tokens, each image span, `num_text` trained tokens at the end
    (or, if `interleaved`, after every image)."""
    rng = np.random.default_rng((seed, dataset_index, line))
    ids: list[int] = [int(t) for t in rng.integers(10, 128, num_prompt)]
    labels: list[int] = [IGNORE_INDEX] * num_prompt
    for tiles in tiles_per_image:
        span = [IMG_START] + [IMG_CONTEXT] * (tiles * TOKENS_PER_TILE) + [IMG_END]
        ids += span
        labels += [IGNORE_INDEX] * len(span)
        if interleaved:
            text = [int(t) for t in rng.integers(10, 128, num_text)]
            ids += text
            labels += text
    if interleaved and tiles_per_image:
        num_text = 0
    text = [int(t) for t in rng.integers(10, 128, num_text)]
    ids += text
    labels += text
    num_tiles = sum(tiles_per_image)
    noise = rng.standard_normal((num_tiles, 3, TILE_SIZE, TILE_SIZE))
    pixels = np.clip(noise * 40 + 128, 0, 255).astype(np.uint8)  # uint8 RGB, as tile_pixels
    return TokenizedSample(
        input_ids=np.asarray(ids, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        pixel_values=pixels,
        num_tiles_per_image=tuple(tiles_per_image),
        dataset_index=dataset_index,
        source=SampleSource(
            dataset=f"ds{dataset_index}", path=f"ds{dataset_index}.jsonl", line=line
        ),
    )


class FakeSource:
    """Records with random images/text lengths; every `skip_every`-th record is skipped."""

    def __init__(
        self,
        dataset_index: int,
        num_records: int,
        *,
        max_images: int = 2,
        max_tiles: int = 3,
        max_text: int = 30,
        skip_every: int = 0,
    ) -> None:
        self.name = f"ds{dataset_index}"
        self.dataset_index = dataset_index
        self.num_records = num_records
        self.max_images = max_images
        self.max_tiles = max_tiles
        self.max_text = max_text
        self.skip_every = skip_every

    def __len__(self) -> int:
        return self.num_records

    def load(self, record_index: int, epoch: int, seed: int) -> TokenizedSample | SkippedSample:
        if not 0 <= record_index < self.num_records:
            raise IndexError(record_index)
        source = SampleSource(self.name, f"{self.name}.jsonl", record_index + 1)
        if self.skip_every and record_index % self.skip_every == self.skip_every - 1:
            return SkippedSample(self.dataset_index, source, "missing_image", "fake")
        rng = np.random.default_rng((seed, self.dataset_index, record_index, epoch))
        num_images = int(rng.integers(0, self.max_images + 1))
        tiles = tuple(int(t) for t in rng.integers(1, self.max_tiles + 1, num_images))
        num_text = int(rng.integers(1, self.max_text + 1))
        return make_sample(
            self.dataset_index,
            tiles,
            num_text,
            line=record_index + 1,
            seed=int(rng.integers(1 << 30)),
        )
