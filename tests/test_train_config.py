"""train/config.py: defaults, presets, overrides, and errors that name the key (no model is loaded here)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from train.config import CONFIG_DIR, ConfigError, TrainConfig, load_config, resolve_key

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_the_presets_the_issue_asks_for_exist():
    for name in ("tiny-cpu", "smollm2-135m", "diffugpt-s", "diffugpt-m", "diffullama-7b", "gsm8k-sft"):
        assert name in PRESETS, name


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_only_overrides_known_keys(name):
    cfg = load_config(name)
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    for section, values in raw.items():
        if section == "include":                     # the parent preset, tested on its own
            continue
        for key, value in values.items():
            if key in ("sources", "eval_sources"):  # paths are resolved against the repo root
                continue
            got = getattr(getattr(cfg, section), key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert got == pytest.approx(value), f"{section}.{key}"
            else:
                assert got == value, f"{section}.{key}"
    assert cfg.to_dict() != TrainConfig().to_dict()


# The paper's pre-training presets state their token budget in one machine-readable header line (see each file).
PAPER_PRESETS = ("diffugpt-s", "diffugpt-m", "diffullama-7b")
BUDGET = re.compile(r"^# budget: (\d+) steps x (\d+) sequences x (\d+) tokens = (\d+) tokens "
                    r"\((\d+) processes x (\d+) per process x (\d+) accumulation\)$", re.M)


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_match_their_token_budget(name):
    """steps x global batch x length = the documented budget, and the preset's own fields give those numbers."""
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    found = BUDGET.findall(text)
    assert len(found) == 1, f"{name}: one '# budget: ...' header line"
    steps, global_batch, length, tokens, processes, per_process, accum = map(int, found[0])
    assert steps * global_batch * length == tokens
    assert processes * per_process * accum == global_batch
    cfg = load_config(name)
    assert (cfg.run.max_steps, cfg.data.block_size) == (steps, length)
    assert (cfg.run.batch_size, cfg.run.grad_accum) == (per_process, accum)
    assert cfg.run.max_steps * cfg.run.batch_size * cfg.run.grad_accum * processes * cfg.data.block_size == tokens


def test_paper_schedules_as_verified():
    """The numbers docs/training.md says were checked: DiffuGPT-S 1,000k x 256 x 512 (131B tokens seen over a 30B
    split); DiffuLLaMA the released script's 20k steps of 60 x 4 x 2048 on 8 GPUs, sources mixed 0.693584 / 0.306416."""
    s = load_config("diffugpt-s")
    assert (s.run.max_steps, s.data.block_size, s.data.max_tokens) == (1_000_000, 512, 30_000_000_000)
    llama = load_config("diffullama-7b")
    assert llama.data.weights == pytest.approx([0.693584, 0.306416]) and len(llama.data.sources) == 2
    assert llama.data.max_tokens >= llama.run.max_steps * 1920 * llama.data.block_size   # no block read twice


def test_defaults_work_without_a_file():
    cfg = load_config(None)
    assert cfg.run.max_steps > 0 and cfg.optim.lr > 0 and cfg.model.shift is True
    assert cfg.diffusion.weighting == "inverse_t"


def test_overrides_dotted_and_short_and_yaml_values():
    cfg = load_config("tiny-cpu", ["optim.lr=1e-4", "max_steps=7", "lora.enabled=true",
                                   "run.eval_mask_ratios=[0.2, 0.4]", "run.mixed_precision=no"])
    assert cfg.optim.lr == pytest.approx(1e-4)      # PyYAML reads 1e-4 as a string; coerced
    assert cfg.run.max_steps == 7 and cfg.lora.enabled is True
    assert cfg.run.eval_mask_ratios == [0.2, 0.4]
    assert cfg.run.mixed_precision == "no"          # YAML's `no` is False; mapped back for a string field
    assert cfg.model.init["model_type"] == "llama"  # the preset's values survive


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=1", "optim.lr"),                    # unknown key: did you mean
    ("run.max_steps=abc", "run.max_steps"),         # wrong type
    ("run.max_steps=2.5", "run.max_steps"),
    ("lora.enabled=maybe", "lora.enabled"),         # strings are not silently True
    ("run.mixed_precision=fp8", "run.mixed_precision"),
    ("optim.lr=-1", "optim.lr"),                    # out of range
    ("data.block_size=2", "data.block_size"),
    ("data.eval_fraction=1.5", "data.eval_fraction"),
    ("data.skip_blocks=-1", "data.skip_blocks"),
    ("run.eval_mask_ratios=[0.5, 2]", "run.eval_mask_ratios"),
    ("seed=3", "seed"),                             # ambiguous short key (run.seed / data.seed)
    ("nonsense", "key=value"),
    ("run.resume=/no/such/checkpoint", "run.resume"),
])
def test_bad_overrides_fail_fast_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-cpu", [override])
    assert fragment in str(err.value)


def test_bad_yaml_file_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(str(bad))
    bad.write_text("optimizer:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-preset")


def test_a_preset_variant_includes_its_parent(tmp_path):
    """`include:` layers a preset under the file: gsm8k-sft-ar is gsm8k-sft with the AR objective and base."""
    dlm_run, ar_run = load_config("gsm8k-sft"), load_config("gsm8k-sft-ar")
    assert (ar_run.diffusion.objective, ar_run.model.source) == ("ar", "smollm2-135m")
    assert dlm_run.diffusion.objective == "diffusion" and dlm_run.model.source == "smollm2-135m-dlm"
    for section in ("sft", "optim", "lora", "data"):          # the same records, order, steps and tokens
        assert getattr(ar_run, section) == getattr(dlm_run, section)
    assert (ar_run.run.batch_size, ar_run.run.grad_accum, ar_run.run.max_steps) == \
        (dlm_run.run.batch_size, dlm_run.run.grad_accum, dlm_run.run.max_steps)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"include: {b}\nrun:\n  max_steps: 3\n")
    b.write_text(f"include: {a}\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(str(a))
    b.write_text("include: tiny-cpu\nrun:\n  max_steps: 7\n  batch_size: 2\n")
    cfg = load_config(str(a), ["run.batch_size=4"])            # file over its include, overrides over both
    assert (cfg.run.max_steps, cfg.run.batch_size, cfg.model.tokenizer) == (3, 4, "bpe:1024")


def test_invalid_combinations():
    with pytest.raises(ConfigError, match="diffusion.anneal_steps"):
        load_config("tiny-cpu", ["model.attn_implementation=flash_attention_2", "diffusion.anneal_steps=10"])
    with pytest.raises(ConfigError, match="lora.enabled"):
        load_config("tiny-cpu", ["lora.enabled=true", "model.from_scratch=true"])
    with pytest.raises(ConfigError, match="diffusion.distill_weight: needs lora.enabled"):
        load_config("tiny-cpu", ["diffusion.attention=blocks", "diffusion.distill_weight=1"])
    with pytest.raises(ConfigError, match="diffusion.distill_weight: applies to block steps"):
        load_config("tiny-cpu", ["lora.enabled=true", "diffusion.attention=full", "diffusion.distill_weight=1"])
    assert load_config("diffusmol-v2", ["diffusion.distill_weight=1"]).diffusion.distill_weight == 1.0


def test_resolve_key():
    assert resolve_key("lr") == ("optim", "lr")
    assert resolve_key("run.seed") == ("run", "seed")
    with pytest.raises(ConfigError, match="ambiguous"):
        resolve_key("seed")


def test_cli_exits_2_with_the_key_in_the_message(capsys):
    from train.__main__ import main
    assert main(["pretrain", "--config", "tiny-cpu", "optim.lrr=1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["pretrain", "--config", "tiny-cpu", "--max-steps", "0"]) == 2
    assert "run.max_steps" in capsys.readouterr().err


def test_cli_flags_map_to_fields_and_print_config(capsys):
    from train.__main__ import main
    assert main(["pretrain", "--config", "tiny-cpu", "--output-dir", "/tmp/x", "--max-steps", "3",
                 "--save-every", "1", "--print-config", "optim.lr=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run"]["output_dir"] == "/tmp/x" and printed["run"]["max_steps"] == 3
    assert printed["run"]["save_every"] == 1 and printed["optim"]["lr"] == 0.5


def test_missing_data_fails_before_any_model_is_loaded(tmp_path, capsys):
    from train.__main__ import main
    rc = main(["pretrain", "--config", "tiny-cpu", "--output-dir", str(tmp_path / "o"),
               f"data.sources=[{tmp_path / 'missing.txt'}]"])
    assert rc == 2 and "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "o" / "init-model").exists()


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("tiny-cpu", ["optim.lr=0.01"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again.to_dict() == cfg.to_dict()
    assert isinstance(again, TrainConfig)


# ----- accelerate config files ---------------------------------------------------------------------------------------
ACCEL = REPO / "train" / "accelerate"


def _launch_args(name):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    args = launch_command_parser().parse_args(["--config_file", str(ACCEL / name), "-m", "train", "pretrain"])
    return _validate_launch_command(args)[0]


def test_cpu_two_process_config_starts_two_synchronised_processes():
    args = _launch_args("cpu-2proc.yaml")
    # MULTI_GPU + num_processes 2 is what starts two processes (MULTI_CPU wants mpirun and starts one)
    assert args.multi_gpu and args.num_processes == 2
    assert not args.use_deepspeed and not args.use_fsdp


def test_gpu_configs_select_the_right_backend():
    ddp = _launch_args("multi-gpu-ddp.yaml")
    assert ddp.multi_gpu and not ddp.use_deepspeed and not ddp.use_fsdp
    single = _launch_args("single-gpu.yaml")
    assert single.num_processes == 1 and not single.multi_gpu
    z2, z3 = _launch_args("deepspeed-zero2.yaml"), _launch_args("deepspeed-zero3-offload.yaml")
    assert z2.use_deepspeed and int(z2.zero_stage) == 2 and z2.offload_optimizer_device in (None, "none")
    assert z3.use_deepspeed and int(z3.zero_stage) == 3
    assert z3.offload_optimizer_device == "cpu" and z3.offload_param_device == "cpu"
    fsdp = _launch_args("fsdp.yaml")
    assert fsdp.use_fsdp and not fsdp.use_deepspeed
    from accelerate.utils.launch import prepare_multi_gpu_env
    env = prepare_multi_gpu_env(fsdp)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true"  # needed by peft trainable tokens (LoRA + mask row)
