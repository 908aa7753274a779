"""The transformers-native export, usable end to end: weights and config plus processor files.

    InternVL chat dir --model.export.export_hf--> weights, config.json, tokenizer files
                      --write_processor_files--> preprocessor_config.json  GotOcr2 image
                                                   processor: the run's tiling + normalisation
                                                 processor_config.json     InternVLProcessor
                                                 chat_template.jinja       our template layout
                                                 tokenizer_config.json     + the image tokens
                                                                           InternVLProcessor reads

so `AutoProcessor.from_pretrained(out)` + `AutoModelForImageTextToText.generate` give the
prompt ids and pixel values our chat code gives (tests/unit/test_hf_processor.py). It lives
at the top of the package because it needs both the model layout and the data-side tiling
statistics and templates. What transformers' processor cannot reproduce is refused:
`use_thumbnail` False (GotOcr2 always adds a thumbnail), `pad2square` on single tiles, more
than one image per prompt gets the full tile budget per image (ours splits
max_dynamic_patch between them), and videos (InternVL frames are images).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vlpretrain.data.templates import ChatTemplate, TemplateRenderer, get_template
from vlpretrain.data.tiling import NORMALIZE_STATS
from vlpretrain.formats.hf import export_hf, export_internvl
from vlpretrain.model import hub
from vlpretrain.model.llm import load_tokenizer
from vlpretrain.model.vision import VisionConfig
from vlpretrain.model.vlm import VLMConfig, num_image_tokens
from vlpretrain.tokens import IMG_CONTEXT, IMG_END, IMG_START

logger = logging.getLogger(__name__)

PROCESSOR_CLASS = "InternVLProcessor"
IMAGE_PROCESSOR_TYPE = "GotOcr2ImageProcessor"
"""transformers picks its torchvision or PIL backend (GotOcr2ImageProcessorPil) itself: torchvision
when importable, and naming the PIL class here resolves to the same pair, so the config cannot
pin PIL (whose pixels equal training's); docs/checkpoints.md says how readers choose it."""
PIL_BICUBIC = 3
"""PIL.Image.Resampling.BICUBIC, the resampling of our tiling."""
VIDEO_TOKEN = "<video>"
"""InternVLProcessor needs a video token; our data spells videos as this text tag."""
IMAGE_TOKENS = {
    "start_image_token": IMG_START,
    "end_image_token": IMG_END,
    "context_image_token": IMG_CONTEXT,
    "video_token": VIDEO_TOKEN,
}
"""tokenizer_config `extra_special_tokens`: the attributes InternVLProcessor reads."""


def processor_problems(vlm: VLMConfig) -> list[str]:
    """Settings transformers' InternVL processor cannot reproduce."""
    problems = []
    if vlm.dynamic_image_size and not vlm.use_thumbnail:
        problems.append("use_thumbnail False (GotOcr2's tiling always appends a thumbnail)")
    if not vlm.dynamic_image_size and vlm.pad2square:
        problems.append("pad2square True (GotOcr2 resizes a single tile without padding)")
    if vlm.normalize_type not in NORMALIZE_STATS:
        problems.append(f"normalize_type {vlm.normalize_type!r} is unknown")
    return problems


def image_processor_dict(vlm: VLMConfig) -> dict[str, Any]:
    """preprocessor_config.json: the run's tiling and normalisation as GotOcr2 settings."""
    mean, std = NORMALIZE_STATS[vlm.normalize_type]
    side = vlm.force_image_size
    return {
        "image_processor_type": IMAGE_PROCESSOR_TYPE,
        "processor_class": PROCESSOR_CLASS,
        "crop_to_patches": vlm.dynamic_image_size,
        "min_patches": vlm.min_dynamic_patch,
        "max_patches": vlm.max_dynamic_patch,
        "size": {"height": side, "width": side},
        "resample": PIL_BICUBIC,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }


def _literal(text: str) -> str:
    """A jinja string literal (jinja reads JSON's escapes)."""
    return json.dumps(text)


def chat_template_jinja(template: ChatTemplate, bos_token: bool) -> str:
    """A chat template rendering `template`'s layout exactly as our renderer does.

    Each image item becomes `<IMG_CONTEXT>` on its own line ("Image-k: " prefixed when the
    message has several), which InternVLProcessor expands into `<img>` + one context token per
    image token and tile + `</img>`, the same text our placeholder expansion writes. The
    system message is the template's default unless the first message is a system one.
    """
    trim = " | trim" if template.strip_values else ""
    prefix = {"system": template.system_prefix, "user": template.user_prefix,
              "assistant": template.assistant_prefix}  # fmt: skip
    lines = [
        "{%- macro render(content) -%}",
        "{%- if content is string -%}{{ content }}{%- else -%}",
        "{%- set num_images = content | selectattr('type', 'equalto', 'image') | list | length -%}",
        "{%- set seen = namespace(images=0) -%}",
        "{%- for item in content -%}",
        "{%- if item['type'] == 'image' -%}{%- set seen.images = seen.images + 1 -%}",
        "{%- if num_images > 1 -%}{{ 'Image-' ~ seen.images ~ ': ' }}{%- endif -%}",
        "{{ " + _literal(IMG_CONTEXT + "\n") + " }}",
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}",
        "{%- endfor -%}{%- endif -%}",
        "{%- endmacro -%}",
        "{%- set prefix = {"
        + ", ".join(f"{_literal(role)}: {_literal(text)}" for role, text in prefix.items())
        + "} -%}",
        "{%- if bos_token is defined and bos_token -%}{{ bos_token }}{%- endif -%}"
        if bos_token
        else "",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{{ prefix['system'] + render(messages[0]['content']) }}",
        "{%- set turns = messages[1:] -%}",
        "{%- else -%}",
        "{{ prefix['system'] + " + _literal(template.default_system) + " }}",
        "{%- set turns = messages -%}",
        "{%- endif -%}",
        "{{ " + _literal(template.end + template.after_end) + " }}",
        "{%- for message in turns -%}",
        "{{ prefix[message['role']] }}{{ render(message['content'])" + trim + " }}"
        "{{ " + _literal(template.end + template.after_end) + " }}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{ prefix['assistant'] }}{%- endif -%}",
    ]
    return "\n".join(line for line in lines if line) + "\n"


def write_processor_files(chat_dir: Path, hf_dir: Path, bos_token: bool) -> list[str]:
    """Write the processor files of `chat_dir`'s run into the exported `hf_dir`.

    Raises:
        ValueError: a setting transformers' processor cannot reproduce (see module docstring).
    """
    chat = hub.read_config(chat_dir)
    vlm = VLMConfig.from_dict(chat)
    problems = processor_problems(vlm)
    if problems:
        raise ValueError(
            f"{chat_dir}: transformers' InternVL processor cannot reproduce " + "; ".join(problems)
        )
    vision = VisionConfig.from_dict(chat["vision_config"])
    tokens_per_tile = num_image_tokens(
        vlm.force_image_size, vision.patch_size, vlm.downsample_ratio
    )
    files = {
        "preprocessor_config.json": image_processor_dict(vlm),
        "processor_config.json": {
            "processor_class": PROCESSOR_CLASS,
            "image_seq_length": tokens_per_tile,
        },
    }
    for name, content in files.items():
        (hf_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    (hf_dir / "chat_template.jinja").write_text(
        chat_template_jinja(get_template(vlm.template), bos_token)
    )
    tokenizer_config_path = hf_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["extra_special_tokens"] = IMAGE_TOKENS
    tokenizer_config["processor_class"] = PROCESSOR_CLASS
    tokenizer_config.pop("chat_template", None)  # chat_template.jinja is the one template
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    return [*files, "chat_template.jinja", tokenizer_config_path.name]


def export_hf_with_processor(chat_dir: str | Path, out_dir: str | Path) -> Path:
    """`export --to hf`: transformers InternVL weights and config, tokenizer, processor files."""
    source = Path(chat_dir)
    out = export_hf(source, out_dir)
    tokenizer, _ = load_tokenizer(source)
    template = get_template(VLMConfig.from_dict(hub.read_config(source)).template)
    bos = TemplateRenderer(template, tokenizer).bos_id is not None
    written = write_processor_files(source, out, bos_token=bos)
    logger.info("wrote processor files %s", written)
    return out


def export_internvl_without_processor(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """`export --to internvl`: the chat layout; the tokenizer config loses the processor keys
    (chat_template.jinja stays: it is this model's template)."""
    out = export_internvl(hf_dir, out_dir)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("extra_special_tokens") == IMAGE_TOKENS:
        # Loading them would add the video token to the vocabulary, past the embeddings.
        del config["extra_special_tokens"]
    config.pop("processor_class", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out


EXPORTERS = {"hf": export_hf_with_processor, "internvl": export_internvl_without_processor}
"""Export target name (`vlpretrain export --to NAME`) -> the function writing that format."""
