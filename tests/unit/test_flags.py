"""The reference trainer's stage flags resolve onto the same RunConfig fields as our TOML.

The five flag files are InternVL 2.5's published stage scripts, one `--flag value` per line
with shell quoting. Copies live in tests/assets/reference_flags/ so the tests do not need the
shared/ folder; a test checks the copies still match it when it is present.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import pytest

from vlpretrain.cli import main, split_reference_flags
from vlpretrain.config import ConfigError, build_run_config, validate
from vlpretrain.flags import EVALUATION_FLAGS, FLAG_TABLE, IGNORED, SPECIAL, apply_reference_flags
from vlpretrain.train.optim import warmup_steps

REPO = Path(__file__).resolve().parents[2]
FLAGS_DIR = REPO / "tests" / "assets" / "reference_flags"
SHARED_FLAGS_DIR = REPO / ".." / "shared" / "reference"

STAGE_1B_1 = "internvl2_5_1b_qwen2_5_0_5b_dynamic_res_stage1"
STAGE_1B_2 = "internvl2_5_1b_qwen2_5_0_5b_dynamic_res_stage2"
STAGE_8B_1 = "internvl2_5_8b_internlm2_5_7b_dynamic_res_stage1"
STAGE_8B_15 = "internvl2_5_8b_internlm2_5_7b_dynamic_res_stage1_5"
STAGE_8B_2 = "internvl2_5_8b_internlm2_5_7b_dynamic_res_stage2"

# Per stage: Path A (model_name_or_path) or B (vision_path + llm_path); freeze_backbone,
# freeze_llm, freeze_mlp; learning rate; weight decay; drop_path_rate; warmup_steps flag;
# warmup_ratio flag; max_steps; gradient accumulation; resolved warmup steps.
EXPECTED = {
    STAGE_1B_1: ("B", (True, True, False), 2e-4, 0.01, 0.0, 100, 0.0, 100000, 1, 100),
    # warmup = ceil(0.03 * 22000) = 660
    STAGE_1B_2: ("A", (False, False, False), 4e-5, 0.01, 0.1, 0, 0.03, 22000, 1, 660),
    STAGE_8B_1: ("B", (True, True, False), 2e-4, 0.05, 0.0, 100, 0.0, 100000, 1, 100),
    STAGE_8B_15: ("A", (False, True, False), 1e-5, 0.05, 0.1, 100, 0.0, 100000, 2, 100),
    # warmup = ceil(0.03 * 5500) = ceil(165.0) = 165
    STAGE_8B_2: ("A", (False, False, False), 4e-5, 0.05, 0.1, 0, 0.03, 5500, 1, 165),
}


def flag_argv(name: str, root: Path) -> list[str]:
    """The stage's flags as argv, with its placeholder paths made real under `root`."""
    argv = shlex.split((FLAGS_DIR / f"{name}.flags").read_text())
    out = []
    for token in argv:
        if token == "OUTPUT_DIR":
            token = str(root / "output")
        elif token.startswith(("./pretrained/", "./work_dirs/")):
            token = str(root / token[2:])
            Path(token).mkdir(parents=True, exist_ok=True)
        elif token.startswith("./path/to/"):
            token = str(root / token[2:])
            Path(token).parent.mkdir(parents=True, exist_ok=True)
            Path(token).write_text("{}")
        out.append(token)
    return out


def resolve(argv: list[str]) -> tuple:
    raw: dict = {}
    notes = apply_reference_flags(raw, argv)
    return build_run_config(raw), notes


def test_flag_file_copies_match_shared_reference():
    names = sorted(p.name for p in FLAGS_DIR.glob("*.flags"))
    assert names == sorted(f"{n}.flags" for n in EXPECTED)
    if not SHARED_FLAGS_DIR.is_dir():
        pytest.skip("../shared/reference is not present beside the repo")
    for name in names:
        assert (FLAGS_DIR / name).read_text() == (SHARED_FLAGS_DIR / name).read_text(), name


def test_flag_files_are_shell_quoted_pairs():
    for name in EXPECTED:
        argv = shlex.split((FLAGS_DIR / f"{name}.flags").read_text())
        assert len(argv) % 2 == 0
        assert all(flag.startswith("--") for flag in argv[::2])
    # Quotes are the shell's, not part of the value.
    argv = shlex.split((FLAGS_DIR / f"{STAGE_1B_1}.flags").read_text())
    assert argv[argv.index("--ps_version") + 1] == "v2"
    assert argv[argv.index("--conv_style") + 1] == "internvl2_5"


@pytest.mark.parametrize("name", list(EXPECTED), ids=lambda n: n.split("dynamic_res_")[-1])
def test_reference_stage_flags_resolve(name, tmp_path):
    path, freeze, lr, wd, drop, warm_steps, warm_ratio, max_steps, ga, warmup = EXPECTED[name]
    config, _ = resolve(flag_argv(name, tmp_path))
    validate(config, world_size=8)  # placeholder paths exist, so the stage is runnable

    if path == "A":
        assert config.model.model_name_or_path.startswith(str(tmp_path / "work_dirs"))
        assert config.model.vision_path == config.model.llm_path == ""
    else:
        assert config.model.model_name_or_path == ""
        assert config.model.vision_path.startswith(str(tmp_path / "pretrained/InternViT-300M"))
        assert config.model.llm_path.startswith(str(tmp_path / "pretrained"))
    f = config.freeze
    assert (f.freeze_backbone, f.freeze_llm, f.freeze_mlp) == freeze
    assert config.optim.learning_rate == lr
    # --learning_rate is the base of every module: the reference trains all at one rate.
    assert config.optim.module_learning_rates() == {"vision": lr, "projector": lr, "llm": lr}
    assert config.optim.vision_layer_decay == 1.0
    assert config.optim.weight_decay == wd
    assert config.model.drop_path_rate == drop
    assert config.optim.warmup_steps == warm_steps
    assert config.optim.warmup_ratio == warm_ratio
    assert config.train.max_steps == max_steps
    assert config.train.gradient_accumulation_steps == ga
    assert warmup_steps(config.optim, config.train.max_steps) == warmup
    assert warmup == (warm_steps or math.ceil(warm_ratio * max_steps))

    # Settings every InternVL 2.5 stage script shares.
    assert config.packing.loss_reduction == "square"
    assert config.packing.num_images_expected == 48
    assert config.packing.max_packed_tokens == 16384
    assert config.packing.max_buffer_size == 20
    assert config.packing.strict_mode is False
    assert config.packing.rows_per_batch == 1
    assert config.data.max_seq_length == 16384
    assert config.train.precision == "bf16"  # --bf16 True
    assert config.train.loss_reduction_all_gather is True
    assert config.train.report_to == ("tensorboard",)
    assert config.train.output_dir == str(tmp_path / "output")
    assert config.model.use_fast_tokenizer is False  # --use_fast_tokenizer False
    assert config.train.resume == "never"  # --overwrite_output_dir True: never auto-resume
    assert config.optim.lr_scheduler_type == "cosine"
    # --deepspeed zero_stage1_config.json: ZeRO-1 -> FSDP2 that keeps gathered weights.
    assert config.dist.strategy == "fsdp"
    assert config.dist.reshard_after_forward is False
    assert config.dist.cpu_offload is False


def test_stage1_flags_resolve_every_shape_setting(tmp_path):
    config, _ = resolve(flag_argv(STAGE_1B_1, tmp_path))
    assert config.model.force_image_size == 448
    assert config.model.down_sample_ratio == 0.5
    assert config.model.ps_version == "v2"
    assert config.model.vision_select_layer == -1
    assert config.model.conv_style == "internvl2_5"
    assert config.data.dynamic_image_size is True
    assert config.data.use_thumbnail is True
    assert (config.data.min_num_frame, config.data.max_num_frame) == (8, 32)
    assert config.stream.num_workers == 8
    assert config.stream.replacement is False
    assert config.train.save_steps == 100
    assert config.train.save_total_limit == 3
    assert config.train.grad_checkpoint is True


def test_plumbing_flags_are_ignored_with_a_note(tmp_path):
    _, notes = resolve(flag_argv(STAGE_8B_15, tmp_path))
    ignored = sorted(note.split()[0] for note in notes)
    assert ignored == sorted(
        [
            "--save_strategy",
            "--do_train",
            "--group_by_length",
            "--use_packed_ds",
            "--log_freq",
            "--remove_unused_columns",
        ]
    )
    assert all(" ignored: " in note for note in notes)


def test_every_flag_of_every_stage_is_mapped_or_ignored():
    known = {*FLAG_TABLE, *SPECIAL, *IGNORED, *EVALUATION_FLAGS}
    for name in EXPECTED:
        argv = shlex.split((FLAGS_DIR / f"{name}.flags").read_text())
        assert {flag[2:] for flag in argv[::2]} <= known, name


def test_reference_scripts_evaluation_strategy_no_means_no_evaluation(tmp_path):
    config, _ = resolve(flag_argv(STAGE_8B_15, tmp_path))  # --evaluation_strategy "no"
    assert config.eval.steps == 0


PATHS = ["--vision_path", "v", "--llm_path", "l", "--eval_meta_path", "held_out.json"]


@pytest.mark.parametrize(
    ("flags", "steps"),
    [
        (["--evaluation_strategy", "steps", "--eval_steps", "50"], 50),
        (["--eval_steps", "50", "--evaluation_strategy", "steps"], 50),  # order does not matter
        # HF Trainer: eval_steps defaults to logging_steps
        (["--logging_steps", "10", "--evaluation_strategy", "steps"], 10),
        (["--evaluation_strategy", "no", "--eval_steps", "50"], 0),  # no: eval_steps unused
        (["--eval_steps", "50"], 0),  # the default strategy is no
    ],
)
def test_evaluation_flags_map_as_hf_trainer_reads_them(flags, steps):
    config, notes = resolve([*PATHS, *flags])
    assert config.eval.steps == steps and config.eval.meta == "held_out.json"
    assert notes == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--evaluation_strategy", "epoch"], "no epochs"),
        (["--evaluation_strategy", "steps", "--eval_steps", "0.1"], "whole number"),
    ],
)
def test_evaluation_flags_without_a_meaning_here_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve([*PATHS, *flags])


def test_evaluation_without_held_out_data_is_refused():
    # The reference passes no evaluation data, so its steps strategy needs our flag.
    with pytest.raises(ConfigError, match="eval.meta"):
        resolve(["--vision_path", "v", "--llm_path", "l", "--evaluation_strategy", "steps"])


@pytest.mark.parametrize(
    ("value", "strategy", "reshard", "offload"),
    [
        ("zero_stage1_config.json", "fsdp", False, False),
        ("zero_stage2_config.json", "fsdp", False, False),
        ("zero_stage3_config.json", "fsdp", True, False),
        ("zero_stage3_config_offload.json", "fsdp", True, True),
    ],
)
def test_deepspeed_config_name_maps_to_fsdp(value, strategy, reshard, offload, tmp_path):
    config, _ = resolve(["--vision_path", "v", "--llm_path", "l", "--deepspeed", value])
    assert (config.dist.strategy, config.dist.reshard_after_forward) == (strategy, reshard)
    assert config.dist.cpu_offload is offload


def test_deepspeed_json_file_is_read_when_it_exists(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}')
    config, _ = resolve(["--vision_path", "v", "--llm_path", "l", "--deepspeed", str(path)])
    assert config.dist.strategy == "fsdp"
    assert config.dist.reshard_after_forward is True
    assert config.dist.cpu_offload is True
    path.write_text('{"zero_optimization": {"stage": 0}}')
    config, _ = resolve(["--vision_path", "v", "--llm_path", "l", "--deepspeed", str(path)])
    assert config.dist.strategy == "ddp"


def test_deepspeed_name_without_stage_is_an_error():
    with pytest.raises(ConfigError, match="does not say the ZeRO stage"):
        resolve(["--vision_path", "v", "--llm_path", "l", "--deepspeed", "ds_config.json"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "must hold a JSON object (a DeepSpeed config), got a list"),
        ("{not json", "is not valid JSON (line 1 column 2)"),
        ('{"zero_optimization": [3]}', '"zero_optimization" must be an object, got a list'),
        ('{"zero_optimization": {"stage": 7}}', "ZeRO stage 7 is not supported; use 0, 1, 2 or 3"),
        ('{"zero_optimization": {"stage": "3"}}', "ZeRO stage '3' is not supported; use 0, 1,"),
        ('{"zero_optimization": {"stage": true}}', "ZeRO stage True is not supported; use 0, 1,"),
    ],
)
def test_deepspeed_json_that_cannot_be_mapped_names_the_file(content, message, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        resolve(["--vision_path", "v", "--llm_path", "l", "--deepspeed", str(path)])
    [problem] = caught.value.problems
    assert problem.startswith(f"--deepspeed: {path}")
    assert message in problem


def test_deepspeed_json_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_bytes(b'{"zero_optimization": {"stage": 2}, "note": "\xff"}')
    with pytest.raises(ConfigError, match=f"--deepspeed: {path} is not UTF-8 text"):
        resolve(["--vision_path", "v", "--llm_path", "l", "--deepspeed", str(path)])


def test_deepspeed_directory_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        resolve(["--vision_path", "v", "--llm_path", "l", "--deepspeed", str(tmp_path)])
    assert caught.value.problems == [
        f"--deepspeed: {tmp_path} is a directory; give the DeepSpeed JSON file"
    ]


def test_deepspeed_name_with_an_unsupported_stage_is_an_error():
    with pytest.raises(ConfigError, match="ZeRO stage 7 is not supported; use 0, 1, 2 or 3"):
        resolve(["--vision_path", "v", "--llm_path", "l", "--deepspeed", "zero_stage7.json"])


def test_flag_value_nested_too_deeply_is_one_problem_naming_the_flag():
    with pytest.raises(ConfigError) as caught:
        resolve(["--vision_path", "v", "--max_steps", "[" * 5000 + "]" * 5000])
    [problem] = caught.value.problems
    assert problem.startswith("--max_steps: value [[[[")
    assert problem.endswith("nests arrays or inline tables too deeply (5000 levels); at most 100 "
                            "levels are read")  # fmt: skip


def test_unknown_flag_lists_known_flags():
    with pytest.raises(ConfigError) as caught:
        resolve(["--vision_path", "v", "--llm_path", "l", "--freeze_lm", "True"])
    [problem] = caught.value.problems
    assert problem.startswith("unknown flag --freeze_lm; known flags: ")
    for name in ("freeze_llm", "freeze_backbone", "learning_rate", "deepspeed", "bf16"):
        assert name in problem


def test_bad_flag_values_are_all_reported():
    argv = ["--vision_path", "v", "--bf16", "maybe", "--freeze_lm", "x", "--deepspeed", "x.json"]
    with pytest.raises(ConfigError) as caught:
        resolve(argv)
    assert len(caught.value.problems) == 3


def test_bf16_false_means_fp32():
    config, _ = resolve(["--vision_path", "v", "--llm_path", "l", "--bf16", "False"])
    assert config.train.precision == "fp32"


def test_flag_value_with_equals_sign_form():
    config, _ = resolve(["--vision_path=v", "--llm_path=l", "--learning_rate=3e-5"])
    assert config.optim.learning_rate == 3e-5


def test_dangling_flag_is_an_error():
    with pytest.raises(ConfigError, match="flag --llm_path has no value"):
        resolve(["--vision_path", "v", "--llm_path"])


def test_cli_splits_reference_flags_from_its_own_arguments():
    # A flag's value must never be taken for the positional config file.
    own, reference = split_reference_flags(
        ["--log-all-ranks", "train", "--vision_path", "vit", "stage.toml", "--set", "a.b=1"]
    )
    assert own == ["--log-all-ranks", "train", "stage.toml", "--set", "a.b=1"]
    assert reference == ["--vision_path", "vit"]
    # `data check/show` take the run's flags too: the run's config, not the defaults
    own, reference = split_reference_flags(
        ["data", "check", "stage.toml", "--meta_path", "m.json", "--all", "--workers", "2"]
    )
    assert own == ["data", "check", "stage.toml", "--all", "--workers", "2"]
    assert reference == ["--meta_path", "m.json"]
    # Other commands are left to argparse entirely.
    argv = ["chat", "q?", "--model", "dir"]
    assert split_reference_flags(argv) == (argv, [])


def test_show_config_accepts_a_whole_reference_script(tmp_path, capsys):
    """`vlpretrain show-config $(cat stage.flags)`: no TOML file, only reference flags."""
    argv = flag_argv(STAGE_8B_15, tmp_path)
    assert main(["show-config", *argv]) == 0
    out = capsys.readouterr().out
    assert "learning_rate = 1e-05" in out
    assert "gradient_accumulation_steps = 2" in out
    assert 'strategy = "fsdp"' in out
    assert "vision_select_layer = -1" in out


def test_set_wins_over_reference_flags(tmp_path, capsys):
    argv = [*flag_argv(STAGE_1B_1, tmp_path), "--set", "optim.learning_rate=1e-3"]
    assert main(["show-config", *argv]) == 0
    assert "learning_rate = 0.001" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "resume"),
    [
        # The reference: resume from output_dir's last checkpoint unless overwrite_output_dir;
        # an explicit --resume_from_checkpoint wins in either case (in any order).
        ([], "auto"),
        (["--overwrite_output_dir", "True"], "never"),
        (["--overwrite_output_dir", "False"], "auto"),
        (["--resume_from_checkpoint", "CKPT", "--overwrite_output_dir", "True"], "CKPT"),
        (["--overwrite_output_dir", "True", "--resume_from_checkpoint", "CKPT"], "CKPT"),
    ],
)
def test_overwrite_output_dir_decides_auto_resume_as_in_the_reference(argv, resume, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    argv = [str(checkpoint) if token == "CKPT" else token for token in argv]
    config, _ = resolve(["--vision_path", "v", "--llm_path", "l", *argv])
    assert config.train.resume == (str(checkpoint) if resume == "CKPT" else resume)


def test_use_fast_tokenizer_flag_sets_the_model_field():
    for text, expected in (("False", False), ("True", True)):
        config, _ = resolve(["--vision_path", "v", "--llm_path", "l", "--use_fast_tokenizer", text])
        assert config.model.use_fast_tokenizer is expected


def test_reference_seed_flag_seeds_model_and_data():
    raw: dict = {}
    apply_reference_flags(raw, ["--seed", "7"])
    assert raw["train"]["seed"] == 7 and raw["stream"]["seed"] == 7


@pytest.mark.parametrize(
    "text, expected",
    [
        ("wandb", ("wandb",)),
        ("mlflow", ("mlflow",)),
        ("tensorboard", ("tensorboard",)),
        ("wandb,mlflow", ("wandb", "mlflow")),  # several names, comma-separated
        ("all", ("all",)),  # every installed tracker, as the reference means it
        ("none", ("none",)),
    ],
)
def test_report_to_flag_names_the_trackers(text, expected):
    config, _ = resolve(["--vision_path", "v", "--llm_path", "l", "--report_to", text])
    assert config.train.report_to == expected


def test_report_to_flag_with_a_tracker_we_lack_is_refused_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"train.report_to must be one of .*'wandb'.*'comet_ml'"):
        resolve(["--vision_path", "v", "--llm_path", "l", "--report_to", "comet_ml"])
