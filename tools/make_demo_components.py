"""Make the demo's "pretrained" components once: a ViT and an LLM, each trained briefly alone.

    python tools/make_demo_components.py [--output vlpretrain/demo/assets] [--set pretrain.F=V]

`vlpretrain demo` starts from the directories this writes (vit/, llm/ and components.json,
shipped as package data), so a demo run trains only the three stages. Every random choice is
seeded from PretrainConfig.seed, so rerunning the script gives the same components; shipping
the files keeps the demo's figures from depending on this CPU's kernels for pretraining. Takes
about 2.5 minutes on 2 cores. Rerun it (and commit what it writes) whenever this file changes:
tests/unit/test_demo_assets.py checks that the shipped settings are the ones below.

InternVL's recipe starts from a pretrained vision encoder and a pretrained LLM. With nothing
to download, the demo uses tiny ones pretrained here:

    training-side shapes scenes --render as one tile--> InternViT --pixel shuffle--> one
        feature per cell of the token grid --linear probe--> what the cell holds (shape kind
        or nothing, colour, size) and which cell it is --> vit/
    training-side scenes written as text --causal LM on packed rows--> llm/ (+ tokenizer)

The LLM's corpus is the shapes world in words: chat texts whose user turn shows the scene
as a "picture in words", <img> + one word per cell of the 3x3 layout (CELL_TOKENS, row-major,
the order of the image tokens; a word names the cell's shape and its place) + </img>,
followed by a caption request or questions, plus pure-text arithmetic. So the LLM knows the
concepts and the layout before it sees a pixel, the way a real LLM knows "red circle" from
text; stage 1 still has to learn the mapping from ViT features to those words, and nothing in
the corpus is a held-out layout.

Both are saved as the HF-format directories that Path B loads, like real checkpoints. The
probe is thrown away.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM

from vlpretrain.config import ConfigError, override_dataclass
from vlpretrain.data.templates import get_template
from vlpretrain.data.tiling import normalize
from vlpretrain.model.build import new_vision, save_vision
from vlpretrain.model.projector import pixel_shuffle
from vlpretrain.model.vision import InternViT, VisionConfig
from vlpretrain.testing.components import TINY_VISION, tiny_llm_config
from vlpretrain.testing.shapes import (
    COLOURS,
    DESCRIBE,
    KINDS,
    POSITIONS,
    SIZES,
    SQUARE,
    Scene,
    Shape,
    caption,
    caption_corpus,
    chat_text,
    draw_scene,
    text_question,
)
from vlpretrain.testing.synthetic import cell_index, question_pairs, render_scene
from vlpretrain.testing.tokenizer import train_tiny_tokenizer
from vlpretrain.tokens import IMG_END, IMG_START

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "vlpretrain" / "demo" / "assets"
"""Where the demo reads its components from (package data)."""

IGNORE = -100
"""Target of a cell field that does not apply (the colour of an empty cell)."""


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """How the demo's components are pretrained; the defaults made the shipped ones."""

    seed: int = 0
    tile_size: int = 48
    vision_layers: int = 2
    vision_hidden: int = 64
    vision_patch: int = 8
    """8-px patches: a 48-px tile is 6x6 patches -> a 3x3 grid of LLM tokens after pixel
    shuffle, one token per cell of the scene's layout."""
    vision_steps: int = 200
    vision_batch: int = 32
    vision_lr: float = 2e-3
    held_out_fraction: float = 0.1
    """Scenes of held-out layouts are never drawn (testing.shapes.is_held_out); the demo's
    dataset holds out the same share, so no component ever saw a layout the demo evaluates
    on."""
    llm_hidden: int = 128
    llm_layers: int = 2
    llm_heads: tuple[int, int] = (4, 4)
    """(attention heads, key/value heads). 4 and 4 on this EPYC with two threads, from perfect
    words (bench/demo_llm_probe.py --pretrain 0 1 2 --jobs 1, at 1500 steps): every type at
    least 79, "shape at" 98, 90, 91; with 4 and 2 colour 100, 70, 99 and "shape at" 77, 100,
    93. On the Xeon, 8 and 2 answered colour 80, 99, 85, 93; 8 and 4 colour 100, 100, 100, 86
    but "shape at" 90, 93, 83, 84 (docs/demo-notes.md)."""
    llm_steps: int = 2000
    """The place lookup behind "shape at" is the last thing the LLM learns, and when depends on
    the CPU's kernels. On this EPYC with two threads (bench/demo_figures.py), rows packed in
    corpus order (78% real tokens) needed 2500 steps and stage 2 at 1000 for seed 2's "shape
    at" to reach 82 (1500 steps with stage 2 at 700: 74); rows packed best fit (97% real,
    pack_texts) see the same tokens in 2000 steps, and seed 2's "shape at" answered 94, at
    244 s [226-246] per run against 270 s [266-278]. On an AVX-512 Xeon
    at 1500 steps, seed 1's colour answered 75 from perfect words; 2000 steps gave 74, lr 3e-3
    colour 70 and a 192-wide LLM "shape at" 69 (docs/demo-notes.md)."""
    llm_batch: int = 8
    llm_row_tokens: int = 256
    llm_lr: float = 2e-3
    """Set with CellWordEmbedding's word-built cells; before them, at 5e-3, the loss stalled near
    0.15 and "shape at" answers from perfect words near 60%; with them, 4e-3 at 1500 steps
    left seed 0's colour answers at 73% (bench/demo_llm_probe.py)."""
    llm_weight_decay: float = 0.01
    """AdamW weight decay of the LLM. At 0.3, from perfect words, seeds 1 and 3 answered colour
    87 and 69 and "shape at" 68 and 71 (`bench/demo_llm_probe.py --pretrain 1 3 --set
    pretrain.llm_weight_decay=0.3`): worse than at 0.01."""
    llm_init_std: float = 0.1
    """Initial weight std of the LLM. At Qwen2's 0.02 the tiny LLM sits on the plateau where
    attention is uniform and answers follow the marginal (it never reads the picture in
    words); starting wider it leaves the plateau within a couple hundred steps."""
    llm_texts: int = 6000
    """Texts of the LLM's corpus, each seen about 12 times. Seeds 1 and 3 from perfect words:
    at 48000 (nearly every text fresh) colour 66 and 76, position 69 and 76; at 2500 colour 69
    and 92, "shape at" 100 and 80 (bench/demo_llm_probe.py)."""
    llm_snapshot_steps: tuple[int, ...] = ()
    """Also save the LLM (and tokenizer) after these steps, as OUTPUT_stepN beside OUTPUT, to
    see when each skill appears (bench/demo_llm_probe.py takes the directories)."""
    llm_caption_share: float = 0.25
    """Share of the LLM's texts that caption a picture in words."""
    llm_text_share: float = 0.1
    """Share of pure-text questions; the rest ask 1-6 questions about a picture in words."""
    vocab_size: int = 768
    """BPE vocabulary with the 121 cell words and chat tokens: room for whole answer words."""

    @property
    def cell_grid(self) -> int:
        """Cells per side of a tile: one LLM token each, after 2x2 pixel shuffle of the patches."""
        return self.tile_size // self.vision_patch // 2


def cell_targets(scene: Scene, grid: int) -> np.ndarray:
    """(grid*grid, 4) int64: per token cell, kind + 1 (0 = empty), colour, size (IGNORE if
    empty) and the cell's own index (so the features say where they are, as cell words do).

    A shape belongs to the cell holding its centre; cells are in row-major order, the order
    of the pixel-shuffled tokens (ps_version v2).
    """
    targets = np.full((grid * grid, 4), IGNORE, dtype=np.int64)
    targets[:, 0] = 0
    targets[:, 3] = np.arange(grid * grid)
    for shape in scene.shapes:
        targets[cell_index(shape.position, grid), :3] = (
            KINDS.index(shape.kind) + 1, COLOURS.index(shape.colour), SIZES.index(shape.size)
        )  # fmt: skip
    return targets


class CellProbe(nn.Module):
    """Linear heads on each pixel-shuffled token: kind-or-empty, colour, size, which cell."""

    def __init__(self, vision_hidden: int, num_cells: int) -> None:
        super().__init__()
        self.sizes = [len(KINDS) + 1, len(COLOURS), len(SIZES), num_cells]
        self.heads = nn.Linear(4 * vision_hidden, sum(self.sizes))

    def forward(self, hidden_NPC: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits (N, T, k) per head from ViT output with CLS first."""
        patches = hidden_NPC[:, 1:]
        side = math.isqrt(patches.shape[1])
        grid = pixel_shuffle(patches.reshape(patches.shape[0], side, side, -1), 0.5, "v2")
        logits_NTK = self.heads(grid.reshape(grid.shape[0], -1, grid.shape[-1]))
        return logits_NTK.split(self.sizes, dim=-1)


def probe_loss(logits: tuple[torch.Tensor, ...], targets_NT4: torch.Tensor) -> torch.Tensor:
    return sum(
        (F.cross_entropy(part.flatten(0, 1), targets_NT4[..., k].flatten(), ignore_index=IGNORE)
         for k, part in enumerate(logits)),
        start=torch.zeros(()),
    )  # fmt: skip


def vision_batch(
    rng: np.random.Generator, config: PretrainConfig, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (size, 3, S, S) of square training-side scenes and their cell targets."""
    scenes = [
        draw_scene(rng, config.tile_size, aspects=SQUARE,
                   held_out_fraction=config.held_out_fraction)
        for _ in range(size)
    ]  # fmt: skip
    pixels = normalize([render_scene(s) for s in scenes], "imagenet", config.tile_size)
    targets = np.stack([cell_targets(s, config.cell_grid) for s in scenes])
    return torch.from_numpy(pixels), torch.from_numpy(targets)


def vision_config(config: PretrainConfig) -> VisionConfig:
    return replace(
        TINY_VISION,
        image_size=config.tile_size,
        patch_size=config.vision_patch,
        hidden_size=config.vision_hidden,
        intermediate_size=2 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
    )


def probe_accuracy(vision: InternViT, probe: CellProbe, config: PretrainConfig) -> float:
    """Share of cells whose kind, colour, size and index the probe all gets right (fresh
    scenes)."""
    pixels, targets = vision_batch(np.random.default_rng([config.seed, 12]), config, 256)
    with torch.no_grad():
        splits = probe(vision(pixels))
    right = torch.ones(targets.shape[:2], dtype=torch.bool)
    for k, part in enumerate(splits):
        applies = targets[..., k] != IGNORE
        right &= ~applies | (part.argmax(-1) == targets[..., k])
    return float(right.float().mean())


def pretrain_vision(config: PretrainConfig, output_dir: Path) -> Path:
    """Train a tiny InternViT with a per-cell linear probe; save the ViT alone."""
    vision: InternViT = new_vision(vision_config(config), config.seed)
    torch.manual_seed(config.seed)  # the probe's init: a pure function of the seed, as the ViT's
    probe = CellProbe(config.vision_hidden, config.cell_grid**2)
    optimizer = torch.optim.AdamW([*vision.parameters(), *probe.parameters()],
                                  lr=config.vision_lr)  # fmt: skip
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.vision_lr, total_steps=config.vision_steps, pct_start=0.1
    )
    rng = np.random.default_rng([config.seed, 11])
    vision.train()
    for step in range(config.vision_steps):
        pixels, targets = vision_batch(rng, config, config.vision_batch)
        loss = probe_loss(probe(vision(pixels)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.vision_steps - 1:
            logger.info("vit pretraining step %d: probe loss %.4f", step, loss.item())
    vision.eval()
    logger.info("vit pretraining: probe gets %.1f%% of cells fully right on fresh scenes",
                100 * probe_accuracy(vision, probe, config))  # fmt: skip
    return save_vision(vision, output_dir)


EMPTY_CELL = "<|empty|>"
CELL_ATTRIBUTES: tuple[tuple[str, ...], ...] = (SIZES, COLOURS, KINDS, POSITIONS)
"""What a cell word names, in its order: size, colour, kind, place."""
CELL_WORDS: tuple[tuple[str, ...], ...] = tuple(itertools.product(*CELL_ATTRIBUTES))


def _word_token(word: tuple[str, ...]) -> str:
    """The token of a cell word: its attribute values, in CELL_ATTRIBUTES order."""
    return f"<|{' '.join(word)}|>"


CELL_TOKENS: tuple[str, ...] = (EMPTY_CELL, *(_word_token(word) for word in CELL_WORDS))
"""One word per thing a cell can hold and where: whole tokens of the tiny tokenizer. The place
is part of the word, as a ViT token carries where it is: with only rotary positions a 2-layer
LLM reads "which of the 9 cells" poorly (position and shape-at questions from perfect words
near 60%)."""


def cell_word(shape: Shape) -> str:
    return _word_token((shape.size, shape.colour, shape.kind, shape.position))


def picture_in_words(scene: Scene, grid: int) -> str:
    """<img>, the word of each of the grid*grid cells in row-major order, </img>."""
    cells = [EMPTY_CELL] * (grid * grid)
    for shape in scene.shapes:
        cells[cell_index(shape.position, grid)] = cell_word(shape)
    return IMG_START + "".join(cells) + IMG_END


class CellWordEmbedding(nn.Module):
    """Pretraining's embedding of the cell words: a learnt cell marker plus the embeddings of the
    words it names.

    `<|large red circle left|>` is embedded as marker + large + red + circle + left, each the
    table's own row of that answer word. 120 whole words, each seen a few hundred times, would
    each learn alone; built from the words, what is learnt about "red" holds for every red cell,
    and answering "red" about a red cell is copying part of what the cell says, through the tied
    output head. With a free vector per attribute value instead (and lr 5e-3), the 2-layer LLM
    answered from perfect words only 65% of colour and 58% of "shape at" questions on seed 0,
    picking another shape's colour or kind (bench/demo_llm_probe.py). export() writes the sums
    into the table, so the saved LLM is a plain Qwen2.
    """

    def __init__(self, word_ids: list[int], value_ids: list[int], hidden: int) -> None:
        """word_ids: the token of each CELL_WORDS entry; value_ids: the token of each attribute
        value, CELL_ATTRIBUTES flattened in order."""
        super().__init__()
        if len(word_ids) != len(CELL_WORDS):
            raise ValueError(f"need {len(CELL_WORDS)} cell word ids, got {len(word_ids)}")
        total = sum(len(values) for values in CELL_ATTRIBUTES)
        if len(value_ids) != total:
            raise ValueError(f"need {total} attribute value ids, got {len(value_ids)}")
        self.word_ids = torch.tensor(word_ids)
        self.value_ids = torch.tensor(value_ids)
        parts = [[values.index(v) for values, v in zip(CELL_ATTRIBUTES, word, strict=True)]
                 for word in CELL_WORDS]  # fmt: skip
        offsets = np.cumsum([0, *(len(values) for values in CELL_ATTRIBUTES[:-1])])
        self.parts_W4 = torch.tensor(parts) + torch.tensor(offsets)
        self.marker = nn.Parameter(torch.zeros(hidden))

    def table(self, embedding_VD: torch.Tensor) -> torch.Tensor:
        """The embedding table with the cell words' rows replaced by their sums."""
        # Gathers by F.embedding, not by indexing: on CPU with several threads, indexing's
        # backward (index_put_ with accumulate) adds repeated rows in an order that changes run
        # to run, and 1,500 steps turn that last bit into another LLM.
        values_AD = F.embedding(self.value_ids, embedding_VD)
        words_WD = F.embedding(self.parts_W4, values_AD).sum(1) + self.marker
        return embedding_VD.index_copy(0, self.word_ids, words_WD)

    @torch.no_grad()
    def export(self, embedding: nn.Embedding) -> None:
        embedding.weight.copy_(self.table(embedding.weight))


def attribute_value_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token of each attribute value as an answer writes it (CELL_ATTRIBUTES flattened)."""
    ids = []
    for value in itertools.chain.from_iterable(CELL_ATTRIBUTES):
        tokens = tokenizer(value)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"the tokenizer splits the answer word {value!r} into {tokens}; "
                             "cell words are built from whole-word tokens")  # fmt: skip
        ids += tokens
    return ids


def llm_corpus(config: PretrainConfig, system_prompt: str) -> list[str]:
    """config.llm_texts chat texts: a pure-text question (llm_text_share), a picture in words +
    its caption (llm_caption_share), or else a picture + 1-6 questions; held-out layouts never
    appear."""
    rng = np.random.default_rng([config.seed, 13])
    texts = []
    for _ in range(config.llm_texts):
        roll = rng.random()
        if roll < config.llm_text_share:
            texts.append(chat_text([text_question(rng)], system_prompt))
            continue
        scene = draw_scene(rng, config.tile_size, aspects=SQUARE,
                           held_out_fraction=config.held_out_fraction)  # fmt: skip
        picture = picture_in_words(scene, config.cell_grid) + "\n"
        if roll < config.llm_text_share + config.llm_caption_share:
            pairs = [(picture + DESCRIBE, caption(scene))]
        else:
            pairs = question_pairs(rng, scene, int(rng.integers(1, 7)), balanced=True)
            pairs[0] = (picture + pairs[0][0], pairs[0][1])
        texts.append(chat_text(pairs, system_prompt))
    return texts


def answer_labels(ids: list[int], answer_start: list[int], answer_end: int) -> list[int]:
    """`ids` with every token outside an assistant answer set to IGNORE.

    An answer runs from after the `answer_start` token sequence ("<|im_start|>assistant\\n")
    up to and including the `answer_end` token (<|im_end|>), as the training code's template
    supervises it: the LLM learns to answer, not to predict questions or pictures.
    """
    labels = [IGNORE] * len(ids)
    width = len(answer_start)
    inside = False
    for k, token in enumerate(ids):
        if inside:
            labels[k] = token
            inside = token != answer_end
        elif ids[max(0, k - width + 1) : k + 1] == answer_start:
            inside = True
    return labels


def pack_texts(
    token_lists: list[list[int]], label_lists: list[list[int]], row_tokens: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole texts packed into rows: ids, labels, position ids (each (R, row_tokens)).

    Best fit, longest text first: each text goes into the open row it leaves least room in, so
    rows come out nearly full (about 97% of the demo corpus' tokens are real, against 78% when
    texts fill rows in corpus order) and a step's compute goes to text, not padding. Positions
    restart at 0 for every text and for the padding tail, so the LLM's block-diagonal mask
    keeps texts apart, as packed training does. Rows are drawn at random in training, so their
    order does not matter; a text longer than a row is an error, not dropped.
    """
    if len(label_lists) != len(token_lists):
        raise ValueError(f"{len(token_lists)} texts but {len(label_lists)} label lists")
    too_long = [k for k, ids in enumerate(token_lists) if len(ids) > row_tokens]
    if too_long:
        raise ValueError(f"{len(too_long)} texts are longer than a {row_tokens}-token row (the "
                         f"first is text {too_long[0]}, {len(token_lists[too_long[0]])} tokens); "
                         "raise PretrainConfig.llm_row_tokens")  # fmt: skip
    rows: list[list[int]] = []  # the texts of each row, by index
    rows_by_room: list[list[int]] = [[] for _ in range(row_tokens + 1)]  # free tokens -> rows
    order = sorted(range(len(token_lists)), key=lambda k: -len(token_lists[k]))
    for text in order:
        length = len(token_lists[text])
        room = next((r for r in range(length, row_tokens + 1) if rows_by_room[r]), None)
        if room is None:
            row, room = len(rows), row_tokens
            rows.append([])
        else:
            row = rows_by_room[room].pop()
        rows[row].append(text)
        rows_by_room[room - length].append(row)
    ids_RL = torch.full((len(rows), row_tokens), pad_id)
    labels_RL = torch.full((len(rows), row_tokens), IGNORE)
    positions_RL = torch.zeros((len(rows), row_tokens), dtype=torch.long)
    for row, texts in enumerate(rows):
        start = 0
        for text in texts:
            end = start + len(token_lists[text])
            ids_RL[row, start:end] = torch.tensor(token_lists[text])
            labels_RL[row, start:end] = torch.tensor(label_lists[text])
            positions_RL[row, start:end] = torch.arange(end - start)
            start = end
        positions_RL[row, start:] = torch.arange(row_tokens - start)
    return ids_RL, labels_RL, positions_RL


def pretrain_llm(
    config: PretrainConfig, texts: list[str], tokenizer_corpus: list[str], output_dir: Path
) -> Path:
    """Train a BPE tokenizer and a tiny Qwen2 on `texts`; save both in `output_dir`."""
    tokenizer = train_tiny_tokenizer(output_dir, tokenizer_corpus, config.vocab_size,
                                     (IMG_START, IMG_END, *CELL_TOKENS))  # fmt: skip
    torch.manual_seed(config.seed)
    llm_config = tiny_llm_config(len(tokenizer), config.llm_hidden, config.llm_layers,
                                 config.llm_init_std, config.llm_heads)  # fmt: skip
    model = Qwen2ForCausalLM(llm_config)
    token_lists = [tokenizer(t)["input_ids"] for t in texts]
    answer_start = tokenizer("<|im_start|>assistant\n")["input_ids"]
    answer_end = tokenizer("<|im_end|>")["input_ids"][0]
    label_lists = [answer_labels(ids, answer_start, answer_end) for ids in token_lists]
    ids_RL, labels_RL, positions_RL = pack_texts(
        token_lists, label_lists, config.llm_row_tokens, tokenizer.pad_token_id or 0
    )
    real_tokens = sum(len(ids) for ids in token_lists)
    logger.info("llm pretraining: %d texts in %d rows of %d tokens, %.1f%% of them real",
                len(token_lists), len(ids_RL), config.llm_row_tokens,
                100 * real_tokens / ids_RL.numel())  # fmt: skip
    generator = torch.Generator().manual_seed(config.seed)
    embedding = model.model.embed_tokens
    vocabulary = tokenizer.get_vocab()
    cells = CellWordEmbedding([vocabulary[token] for token in CELL_TOKENS[1:]],
                              attribute_value_ids(tokenizer), config.llm_hidden)  # fmt: skip
    optimizer = torch.optim.AdamW([*model.parameters(), *cells.parameters()], lr=config.llm_lr,
                                  weight_decay=config.llm_weight_decay)  # fmt: skip
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.llm_lr, total_steps=config.llm_steps, pct_start=0.1
    )
    model.train()
    for step in range(config.llm_steps):
        pick = torch.randint(len(ids_RL), (config.llm_batch,), generator=generator)
        # The tied output head reads the same table, as the exported model will.
        table_VD = cells.table(embedding.weight)
        hidden_RLD = model.model(
            inputs_embeds=F.embedding(ids_RL[pick], table_VD),
            position_ids=positions_RL[pick],
            use_cache=False,
        ).last_hidden_state
        # Logits only where a label is (a tenth of the tokens): the rest would be thrown away.
        targets_RL = labels_RL[pick][:, 1:]
        supervised = targets_RL != IGNORE
        logits_SV = hidden_RLD[:, :-1][supervised] @ table_VD.T
        loss = F.cross_entropy(logits_SV, targets_RL[supervised])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.llm_steps - 1:
            logger.info("llm pretraining step %d: loss %.4f", step, loss.item())
        if step + 1 in config.llm_snapshot_steps:
            save_llm(
                model, cells, tokenizer, output_dir.parent / f"{output_dir.name}_step{step + 1}"
            )
    cells.export(embedding)
    model.save_pretrained(str(output_dir))
    return output_dir


def save_llm(model: Qwen2ForCausalLM, cells: CellWordEmbedding,
             tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:  # fmt: skip
    """A copy of the LLM in training, cell words exported, saved with its tokenizer."""
    snapshot = copy.deepcopy(model)
    cells.export(snapshot.model.embed_tokens)
    snapshot.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def make_llm(config: PretrainConfig, directory: Path) -> None:
    """Pretrain the demo's LLM (BPE tokenizer, then weights) from its seed's corpus."""
    system = get_template("internvl2_5").default_system
    texts = llm_corpus(config, system)
    system_block = f"<|im_start|>system\n{system}<|im_end|>\n"
    corpus = caption_corpus(config.seed) + [system_block] * 200
    pretrain_llm(config, texts, corpus, directory)


def pretrain_settings(assignments: Sequence[str]) -> PretrainConfig:
    """PretrainConfig with `pretrain.FIELD=VALUE` assignments applied, every problem at once.

    Raises:
        ConfigError: malformed assignments, unknown fields and mistyped values, all listed.
    """
    return override_dataclass(PretrainConfig(), "pretrain", assignments)


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under vit/ and llm/, by path relative to `directory`."""
    files = sorted(p for name in ("vit", "llm") for p in (directory / name).rglob("*"))
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in files
        if path.is_file()
    }


def make_components(config: PretrainConfig, directory: Path) -> Path:
    """vit/, llm/ and components.json (the settings and every file's sha256) in `directory`."""
    for name in ("vit", "llm"):
        shutil.rmtree(directory / name, ignore_errors=True)
    pretrain_vision(config, directory / "vit")
    make_llm(config, directory / "llm")
    manifest = {"settings": asdict(config), "files": file_digests(directory)}
    path = directory / "components.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=ASSETS, help="where vit/ and llm/ go")
    parser.add_argument("--set", action="append", default=[], metavar="pretrain.FIELD=VALUE",
                        help="a PretrainConfig setting, e.g. pretrain.llm_steps=2000")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        config = pretrain_settings(args.set)
    except ConfigError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.output.mkdir(parents=True, exist_ok=True)
    print(f"wrote {make_components(config, args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
