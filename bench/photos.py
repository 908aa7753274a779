"""Real photos for the data benchmarks: scikit-image's sample images, upscaled, saved as JPEG.

    skimage.data (astronaut, coffee, chelsea, rocket, retina, hubble) --bicubic resize-->
    1920x1080 and 4000x3000 JPEGs (quality 90) + an annotation JSONL + a meta file

Upscaled photos keep natural-image statistics (smooth regions, edges, JPEG-friendly), unlike
random noise, which JPEG cannot compress and which decodes at a very different speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field")
SIZES = ((1920, 1080), (4000, 3000))


def _sample_image(name: str) -> np.ndarray:
    from skimage import data  # dev dependency (pyproject [dev])

    pixels = getattr(data, name)()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return pixels[..., :3]


def write_photos(directory: Path, sizes: tuple[tuple[int, int], ...] = SIZES) -> list[str]:
    """Every sample photo at every size, as JPEG files in `directory`; returns the file names."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for photo in PHOTO_NAMES:
        image = Image.fromarray(_sample_image(photo))
        for width, height in sizes:
            name = f"{photo}_{width}x{height}.jpg"
            image.resize((width, height), Image.Resampling.BICUBIC).save(directory / name,
                                                                       quality=90)  # fmt: skip
            names.append(name)
    return names


def write_photo_dataset(root: Path, num_records: int, sizes=SIZES) -> Path:  # noqa: ANN001
    """Annotation + meta file of `num_records` captioning records cycling over the photos."""
    names = write_photos(root / "images", sizes)
    annotation = root / "photos.jsonl"
    with annotation.open("w") as handle:
        for index in range(num_records):
            turns = [{"from": "human", "value": "<image>\nDescribe the photo."},
                     {"from": "gpt", "value": f"photo number {index} of a test set"}]  # fmt: skip
            record = {"id": index, "image": names[index % len(names)], "conversations": turns}
            handle.write(json.dumps(record) + "\n")
    meta = root / "meta.json"
    entry = {"root": str(root / "images"), "annotation": str(annotation), "repeat_time": 1,
             "data_augment": False}  # fmt: skip
    meta.write_text(json.dumps({"photos": entry}))
    return meta
