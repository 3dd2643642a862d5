"""`python -m dlm ...`: JSON round-trips as real subprocesses, one-line errors, real boolean flags."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlm import cli

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dlm", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_json_object(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # exactly one JSON object, nothing else on stdout
    return json.loads(lines[0])


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dlm: error: ") and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_generate_json_round_trip(tiny_llama_dir):
    proc = run_cli("generate", "--model", str(tiny_llama_dir), "--prompt", "Once upon a time",
                   "--max-new-tokens", "8", "--steps", "4", "--seed", "0", "--device", "cpu", "--json")
    out = one_json_object(proc)
    assert out["command"] == "generate" and out["nfe"] == 4 and len(out["token_ids"]) == 8
    assert isinstance(out["text"], str) and out["prompt"] == "Once upon a time"
    assert out["seconds"] > 0 and "frames" not in out
    assert "Traceback" not in proc.stderr and "denoising" not in proc.stderr  # no progress bar off a TTY


def test_fill_json_round_trip_keeps_the_template_text(tiny_llama_dir):
    proc = run_cli("fill", "--model", str(tiny_llama_dir), "--template", "The [MASK:3] sat on the [MASK].",
                   "--seed", "1", "--remasking", "random", "--frames", "--json")
    out = one_json_object(proc)
    assert out["command"] == "fill" and len(out["spans"]) == 2
    assert out["text"] == "The" + out["spans"][0] + " sat on the" + out["spans"][1] + "."   # spans carry their space
    assert all(span.startswith(" ") for span in out["spans"])
    assert out["nfe"] == len(out["frames"]) == 4  # default steps = one per masked token


def test_score_json_round_trip_is_reproducible(tiny_llama_dir):
    args = ("score", "--model", str(tiny_llama_dir), "--context", "The cat sat on the", "--continuation",
            " mat and purred", "--n-samples", "6", "--seed", "2", "--json")
    first, second = one_json_object(run_cli(*args)), one_json_object(run_cli(*args))
    assert first == second
    assert first["method"] == "elbo" and first["n_samples"] == 6 and first["n_tokens"] >= 3
    assert first["logprob"] < 0 and first["stderr"] > 0


def test_bad_input_exits_with_one_line_and_no_traceback(tiny_llama_dir):
    proc = run_cli("score", "--model", str(tiny_llama_dir), "--context", "The cat", "--continuation", "")
    assert_one_line_error(proc, "continuation is empty")
    proc = run_cli("generate", "--model", str(tiny_llama_dir / "missing"), "--prompt", "hi")
    assert_one_line_error(proc, "missing")


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--model", "x", "--prompt", "hi", "--steps", "0"], "--steps"),
    (["generate", "--model", "x", "--prompt", "hi", "--use-cache", "false"], "unrecognized arguments: false"),
    (["fill", "--model", "x"], "--template"),
    (["score", "--model", "x", "--continuation", "a", "--method", "nope"], "--method"),
    (["nonsense"], "invalid choice"),
    (["generate", "--model", "x", "--prompt", "hi", "--seed", str(10**30)], "seed: must be an integer between"),
    (["generate", "--model", "x", "--prompt", "hi", "--temperature", "nan"], "temperature: must be a finite"),
    (["generate", "--model", "x", "--prompt", "hi", "--threshold", "abc"], "threshold: must be a number"),
    (["generate", "--model", "x", "--prompt", "hi", "--decoder", "fast"], "--decoder"),
    (["score", "--model", "x", "--continuation", "a", "--seed", "1.5"], "seed: must be a whole number"),
])
def test_usage_errors_are_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dlm: error: ") and fragment in err[0]


def test_boolean_flags_are_real_booleans_and_unset_keeps_the_model_default():
    parser = cli.build_parser()
    base = ["generate", "--model", "m", "--prompt", "p"]
    off = parser.parse_args(base)
    on = parser.parse_args(base + ["--use-cache", "--suppress-eos", "--json", "--chat"])
    no = parser.parse_args(base + ["--no-stop-at-eos"])
    assert (off.cfg_use_cache, off.cfg_suppress_eos, off.json, off.chat) == (None, None, False, False)
    assert cli._sampler_overrides(off) == {}                      # the model's recommended config decides
    assert (on.cfg_use_cache, on.cfg_suppress_eos, on.json, on.chat) == (True, True, True, True)
    assert cli._sampler_overrides(no) == {"stop_at_eos": False}


def test_sampler_flags_are_generated_from_every_config_field():
    import dlm
    parser = cli.build_parser()
    text = parser._subparsers._group_actions[0].choices["generate"].format_help()
    for f in dlm.SamplerConfig.describe():
        assert "--" + f["name"].replace("_", "-") in text, f["name"]


def test_debug_shows_the_exception(tiny_llama_dir):
    with pytest.raises(ValueError, match="n_samples|continuation"):
        cli.main(["score", "--model", str(tiny_llama_dir), "--continuation", "", "--debug"])


def test_models_and_info(tiny_llama_dir, capsys):
    assert cli.main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = {m["name"]: m for m in out["models"]}
    assert "smollm2-135m" in names and "diffugpt-s" in names
    assert names["diffugpt-s"]["mask_token_id"] == 10541

    assert cli.main(["info", "--model", str(tiny_llama_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] > 0 and info["shift"] is True and info["family"] == "llama"
    assert info["mask_token_id"] == info["vocab_size"] - 1 and info["mask_token"] == "<|mask|>"


def test_animation_is_written_as_gif_and_html(tiny_llama_dir, tmp_path):
    pytest.importorskip("PIL")
    for suffix in ("gif", "html"):
        path = tmp_path / f"run.{suffix}"
        out = one_json_object(run_cli("generate", "--model", str(tiny_llama_dir), "--prompt", "Once upon a time",
                                      "--max-new-tokens", "6", "--steps", "3", "--device", "cpu", "--animation",
                                      str(path), "--json"))
        assert out["animation"] == str(path) and path.stat().st_size > 0 and "frames" not in out
    from PIL import Image
    assert Image.open(tmp_path / "run.gif").n_frames >= 3


def test_kernel_reports_the_path_this_machine_takes(capsys, monkeypatch):
    import json
    monkeypatch.setenv("DLM_CPU_KERNEL", "off")
    assert cli.main(["kernel", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "kernel" and out["policy"] == "off" and out["routes_small_rows"] is False
    monkeypatch.setenv("DLM_CPU_KERNEL", "never")
    assert cli.main(["kernel"]) == 1
    assert "DLM_CPU_KERNEL='never': allowed are auto, on, off" in capsys.readouterr().err


def test_settings_the_decoder_ignores_are_one_note_each_on_stderr(tiny_llama_dir):
    proc = run_cli("generate", "--model", str(tiny_llama_dir), "--prompt", "Once upon a time", "--max-new-tokens",
                   "4", "--no-stop-at-eos", "--device", "cpu", "--json")
    out = one_json_object(proc)                                   # stdout keeps exactly one JSON object
    notes = [line for line in proc.stderr.splitlines() if line.startswith("dlm: note: ")]
    assert len(notes) == 1 and "stop_at_eos=False" in notes[0] and "full decoder" in notes[0], proc.stderr
    assert out["nfe"] == 4


def _flag_for(knob: dict) -> list[str]:
    """A valid command-line setting of one SamplerConfig knob."""
    flag = "--" + knob["name"].replace("_", "-")
    if knob["type"] is bool:
        return [flag if not knob["default"] else "--no-" + flag[2:]]
    value = knob["default"] if knob["default"] is not None else (0.5 if knob["type"] is float else 2)
    return [flag, str(value)]


@pytest.mark.parametrize("knob", [d for d in __import__("dlm").SamplerConfig.describe()], ids=lambda d: d["name"])
def test_ar_refuses_every_knob_left_to_right_generation_does_not_read(knob, monkeypatch, capsys):
    """`--ar` with a knob whose metadata does not say `ar` is an error naming the flag, before anything loads
    (`--ar --no-stop-at-eos` was silently ignored); an `ar` knob goes through to loading."""
    def no_load(args):
        raise RuntimeError("would load")
    monkeypatch.setattr(cli, "_load", no_load)
    assert cli.main(["generate", "--model", "x", "--prompt", "hi", "--ar", *_flag_for(knob)]) == 1
    err = capsys.readouterr().err
    if knob.get("ar"):
        assert "would load" in err, err
    else:
        assert "not read by --ar" in err and "--" + knob["name"].replace("_", "-") in err, err
