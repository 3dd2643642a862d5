"""The decoder / reveal-rule registry (dlm.decoders.registry), what SamplerConfig reads from it, the one reader and
writer of sampler_config.json, and the pure index arithmetic of a block forward (dlm.kv_cache.block_layout)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import dlm
from dlm.decoders.registry import DECODERS, REVEAL_RULES, DecoderSpec, declarations, decoder
from dlm.sampler_config import (
    IgnoredSettingWarning,
    SamplerConfig,
    SamplerConfigError,
    Task,
    load_sampler_configs,
    save_sampler_configs,
)

REPO = Path(__file__).resolve().parent.parent


def test_configs_and_declarations_need_no_torch():
    code = textwrap.dedent("""
        import sys
        import dlm.sampler_config
        from dlm import SamplerConfig
        cfg = SamplerConfig(decoder="speculative", block_length=2, remasking="margin")
        assert cfg.ignored_settings() and SamplerConfig.describe()
        assert "torch" not in sys.modules and "dlm.decoders.full" not in sys.modules, sorted(sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_declarations_read_from_source_are_the_decorators():
    """The built-in entries are read without importing; importing the modules registers the same declarations."""
    read = {name: spec for name, spec in DECODERS.items()}
    for spec in read.values():
        assert spec.load().__name__ == spec.function
    for name in read:
        assert DECODERS[name].fn is not None and DECODERS[name] == read[name]   # fn does not take part in ==
    rules = dict(REVEAL_RULES.items())
    import dlm.reveal  # noqa: F401  (running the decorators registers the same declarations)
    assert dict(REVEAL_RULES.items()) == rules and {"confidence", "margin", "entropy", "random"} <= set(rules)
    assert not REVEAL_RULES["random"].uses_threshold and REVEAL_RULES["margin"].uses_threshold
    per_decoder = {f.name for f in fields(SamplerConfig) if f.metadata.get("per_decoder")}
    assert {"steps", "block_length", "remasking", "threshold", "stop_at_eos", "use_cache"} <= per_decoder
    assert per_decoder == {k for spec in DECODERS.values() for k in spec.uses}   # each read by some decoder
    for spec in DECODERS.values():
        assert set(spec.uses) <= per_decoder and spec.description, spec
    assert DECODERS["full"].fixed_positions and not DECODERS["blocks"].fixed_positions
    assert DECODERS["speculative"].block_mode and not DECODERS["full"].block_mode


def test_declarations_take_literals_only(tmp_path, monkeypatch):
    (tmp_path / "my_rules.py").write_text("SIZE = 3\n\n@reveal_rule('x', description=str(SIZE))\ndef f(p):\n"
                                          "    return p.eligible\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"my_rules.py:3: @reveal_rule\(...\) takes literal arguments only"):
        list(declarations("my_rules", "reveal_rule"))


def test_only_changed_settings_the_decoder_ignores_are_reported():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SamplerConfig(decoder="speculative", block_length=2, stop_at_eos=False, threshold=0.5)   # all read by it
        SamplerConfig(decoder="full", steps=4, use_cache=True)
    assert SamplerConfig(decoder="speculative", block_length=2).ignored_settings() == []
    with pytest.warns(IgnoredSettingWarning, match="steps=4 is ignored: the speculative decoder"):
        cfg = SamplerConfig(decoder="speculative", block_length=2, steps=4, remasking="margin")
    notes = cfg.ignored_settings()
    assert len(notes) == 2 and "steps=4" in notes[0] and "remasking='margin'" in notes[1]
    assert all("speculative decoder" in n and "\n" not in n for n in notes)
    with pytest.raises(SamplerConfigError, match="block_length: the blocks decoder needs a block size"):
        SamplerConfig(decoder="blocks")
    with pytest.raises(SamplerConfigError, match="threshold: needs a certainty-based remasking"):
        SamplerConfig(remasking="random", threshold=0.5)


def test_a_new_decoder_is_one_definition(tiny_dlm):
    """A decoder declared and defined in one place is accepted by the config, listed for the CLI and the app, run
    by `generate`, refused where its declaration says it cannot go, and its ignored settings are reported."""
    from dlm.decoders.run import DecodeRun, Step

    @decoder("test-left-to-right", description="one token per forward, the leftmost mask first")
    def decode_left_to_right(run: DecodeRun):
        canvas, total = run.canvas, int((~run.fixed).sum())
        canvas[~run.fixed] = run.model.mask_token_id
        for index in range(1, total + 1):
            pos = int((canvas[0] == run.model.mask_token_id).nonzero()[0])
            logits = run.call(run.model.denoise_logits, canvas)[0, pos].float().clone()
            logits[run.banned] = float("-inf")
            canvas[0, pos] = int(logits.argmax())
            reveal = torch.zeros_like(run.fixed)
            reveal[0, pos] = True
            yield Step(index, total, reveal, torch.zeros(canvas.shape), canvas.shape[1])

    try:
        assert isinstance(DECODERS["test-left-to-right"], DecoderSpec)
        assert "test-left-to-right" in next(d for d in SamplerConfig.describe() if d["name"] == "decoder")["choices"]
        from dlm import cli
        assert "test-left-to-right" in cli.build_parser()._subparsers._group_actions[0].choices["generate"] \
            .format_help()
        g = tiny_dlm.generate("Once upon a time", max_new_tokens=5, decoder="test-left-to-right", frames=True)
        assert g.nfe == 5 and len(g.token_ids) == 5 and tiny_dlm.mask_token_id not in g.token_ids
        start = g.frames[0].start
        assert [f.revealed for f in g.frames] == [[start + k] for k in range(5)]
        with pytest.warns(IgnoredSettingWarning):
            cfg = SamplerConfig(decoder="test-left-to-right", steps=2, threshold=0.5)
        notes = cfg.ignored_settings()
        assert [n.split("=")[0] for n in notes] == ["steps", "threshold"]
        assert all("test-left-to-right decoder" in n for n in notes)
        keeping = ", ".join(name for name, spec in DECODERS.items() if spec.fixed_positions)
        with pytest.raises(ValueError, match=r"infilling needs the full-attention decoder or another that keeps "
                                             rf"fixed positions \({keeping}; "):
            tiny_dlm.fill("The [MASK:2] dog", decoder="test-left-to-right")
        with pytest.raises(ValueError, match="pins: pinned words need the full-attention decoder"):
            tiny_dlm.generate("Hi", max_new_tokens=4, pins={1: 5}, decoder="test-left-to-right")
        with pytest.raises(ValueError, match="'test-left-to-right' is already declared by"):
            decoder("test-left-to-right")(lambda run: iter(()))
    finally:
        DECODERS.remove("test-left-to-right")
    with pytest.raises(SamplerConfigError, match="decoder: must be one of"):
        SamplerConfig(decoder="test-left-to-right")


def test_sampler_config_json_has_one_reader_and_writer(tmp_path):
    write, infill = SamplerConfig(decoder="blocks", block_length=4, threshold=0.9), SamplerConfig(steps=3, seed=7)
    path = save_sampler_configs(tmp_path, write, infill)
    assert set(json.loads(path.read_text())) == {"generate", "infill"}
    assert load_sampler_configs(tmp_path) == (write, infill)
    assert load_sampler_configs(tmp_path / "none") == (None, None)
    path.write_text(json.dumps(write.to_dict()))                       # a flat file is the generate config
    assert load_sampler_configs(tmp_path) == (write, None)
    path.write_text(json.dumps({"generate": {"steps": 0}}))
    with pytest.raises(SamplerConfigError, match="sampler_config.json: steps: must be an integer >= 1"):
        load_sampler_configs(tmp_path)
    assert not hasattr(SamplerConfig, "save_pretrained") and not hasattr(SamplerConfig, "from_pretrained")


# ------------------------------------------------------------------------------- block_layout (pure arithmetic)

def test_a_task_is_a_str_enum_and_an_unknown_one_names_the_allowed_values():
    assert Task.parse("infill") is Task.INFILL and Task.WRITE == "write" and f"{Task.DENOISE}" == "denoise"
    assert json.dumps({Task.WRITE: 1}) == '{"write": 1}'                  # JSON keys and string callers keep working
    with pytest.raises(ValueError, match=r"^task: must be one of write, infill, denoise, got 'generate'$"):
        Task.parse("generate")
    with pytest.raises(ValueError, match=r"^config: must be one of write, infill, denoise, got \['x'\]$"):
        Task.parse(["x"], field="config")


def test_block_layout_token_causal_after_and_beside():
    from dlm.kv_cache import block_layout
    # 5 cached tokens, 3 new clean ones, a noisy block of 2 after them; the clean rows from the 2nd on are wanted
    lay = block_layout(5, 1, 3, 2, shift=True, clean_causal=True, clean_from=1)
    assert lay.q_block.tolist() == [5, 6, 7, 8, 8] and lay.q_noisy.tolist() == [False] * 3 + [True] * 2
    assert lay.k_block.tolist() == [-1] * 5 + [5, 6, 7, 8, 8] and lay.k_noisy.sum() == 2
    assert lay.keep.tolist() == [1, 2, 3, 4] and lay.n_clean_rows == 2 and lay.lead is None
    assert lay.noisy_at == 3 and lay.n_blocks == 2
    # beside: the noisy block sees the first clean token only, takes the second one's position; row 0 is clean 0's
    lay = block_layout(5, 1, 3, 2, shift=True, clean_causal=True, noisy_from=1, clean_from=0)
    assert lay.q_block.tolist() == [5, 6, 7, 6, 6] and lay.noisy_at == 1 and lay.lead == 0
    # denoise only: with the shift, the clean row before the noisy block and the noisy rows
    lay = block_layout(5, 1, 3, 2, shift=True, clean_causal=True)
    assert lay.keep.tolist() == [2, 3, 4] and lay.n_clean_rows == 1 and lay.lead is None
    lay = block_layout(5, 1, 3, 2, shift=True, clean_causal=True, noisy_from=2)
    assert lay.keep.tolist() == [1, 2, 3, 4] and lay.lead == 0


def test_block_layout_block_wise_commit_and_no_shift():
    from dlm.kv_cache import block_layout
    lay = block_layout(0, 0, 4, 2, shift=True, clean_causal=False, clean_blocks=torch.tensor([0, 0, 1, 1]))
    assert lay.q_block.tolist() == [0, 0, 1, 1, 2, 2] and lay.n_blocks == 2
    lay = block_layout(4, 2, 3, 0, shift=True, clean_causal=False)          # commit only: the last clean row
    assert lay.keep.tolist() == [2] and lay.n_clean_rows == 1 and lay.n_blocks == 3
    lay = block_layout(4, 2, 0, 3, shift=True, clean_causal=False)          # a noisy block alone: the cache's row
    assert lay.keep.tolist() == [0, 1, 2] and lay.n_clean_rows == 0 and lay.n_blocks == 2
    lay = block_layout(4, 2, 3, 2, shift=False, clean_causal=False)         # no shift: noisy rows predict themselves
    assert lay.keep.tolist() == [3, 4] and lay.n_clean_rows == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(noisy_from=0), "noisy_from must be in 1..3"),
    (dict(noisy_from=2, clean_causal=False), "noisy_from must be in 1..3"),
    (dict(predict_after=True, shift=False), "predict_after needs the shift"),
    (dict(clean_from=3), "clean_from must be in 0..2"),
    (dict(clean_from=2, noisy_from=2), "clean_from must be <= noisy_from - 1 = 1"),
])
def test_block_layout_refuses_impossible_requests(kwargs, message):
    from dlm.kv_cache import block_layout
    args = dict(shift=True, clean_causal=True) | kwargs
    with pytest.raises(ValueError, match=message):
        block_layout(5, 1, 3, 2, **args)


def test_the_package_exports_resolve_lazily():
    for name in dlm.__all__:
        assert getattr(dlm, name) is not None
    assert dlm.generation.generate and dlm.DECODERS is DECODERS
    with pytest.raises(AttributeError):
        dlm.no_such_name


def test_version_is_the_packages():
    """dlm.__version__ comes from the installed distribution (pyproject.toml), not a second copy."""
    from pathlib import Path

    import tomllib

    import dlm
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert dlm.__version__ == project["version"]
