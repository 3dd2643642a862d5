"""GPU tests (`pytest -m gpu`): the decoders in bf16, the attention kernels, the exact block cache, bitsandbytes and
training with bf16 autocast, on CUDA. Skipped cleanly without CUDA.

`DLM_GPU_TEST_DEVICE=cpu pytest -m gpu` runs the same assertions on the CPU (the runbook's dry run): what needs CUDA
itself (flash-attn, accelerate's GPU launch configs) skips there, everything else runs the same code.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dlm

REPO = Path(__file__).resolve().parent.parent
DEVICE = torch.device(os.environ.get("DLM_GPU_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(600)]
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs CUDA itself (not part of the CPU dry run)")
PROMPT = "the king"


def _decoders() -> list[str]:
    return next(f["choices"] for f in dlm.SamplerConfig.describe() if f["name"] == "decoder")


@pytest.fixture(scope="module", autouse=True)
def _exact_float32():
    """fp32 comparisons mean fp32: no TF32 matmuls on Ampere and later."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def bf16_model(tiny_llama_dir):
    return dlm.load(tiny_llama_dir, device=DEVICE, dtype="bf16")


@pytest.mark.parametrize("decoder", _decoders())
def test_every_decoder_runs_in_bf16(bf16_model, decoder):
    m = bf16_model
    assert m.device.type == DEVICE.type and m.dtype == torch.bfloat16
    prompt_ids = m.tokenizer(PROMPT)["input_ids"]
    g = m.generate(PROMPT, decoder=decoder, max_new_tokens=8, steps=8, block_length=2, seed=0, frames=True)
    assert g.token_ids and m.mask_token_id not in g.token_ids and g.nfe >= 1
    assert g.frames[-1].tokens[:len(prompt_ids)] == prompt_ids   # the prompt is never rewritten


def test_full_decoder_infills_in_bf16(bf16_model):
    g = bf16_model.fill("the [MASK:3] of the [MASK:2] king", seed=0)
    assert g.text.startswith("the ") and g.text.endswith(" king") and bf16_model.mask_token_id not in g.token_ids


def _greedy(directory, impl, dtype):
    m = dlm.load(directory, device=DEVICE, dtype=dtype, attn_implementation=impl)
    return m.generate(PROMPT, decoder="full", max_new_tokens=12, steps=12, seed=0).token_ids, m


def test_sdpa_and_eager_give_the_same_greedy_tokens(tiny_llama_dir):
    assert _greedy(tiny_llama_dir, "sdpa", "fp32")[0] == _greedy(tiny_llama_dir, "eager", "fp32")[0]


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_matches_sdpa_in_bf16(tiny_llama_dir):
    """Full attention only (flash-attn takes no custom mask): logits within bf16 rounding, greedy tokens alike."""
    flash_tokens, flash = _greedy(tiny_llama_dir, "flash_attention_2", "bf16")
    sdpa_tokens, sdpa = _greedy(tiny_llama_dir, "sdpa", "bf16")
    assert flash.base.config._attn_implementation == "flash_attention_2"
    ids = torch.arange(20, 52, device=DEVICE)[None]
    with torch.no_grad():
        a, b = flash.denoise_logits(ids).float(), sdpa.denoise_logits(ids).float()
    assert ((a - b).norm() / b.norm()).item() < 2e-2
    assert sum(x == y for x, y in zip(flash_tokens, sdpa_tokens)) >= 0.9 * len(sdpa_tokens)


def test_block_cache_equals_uncached(tiny_llama_dir):
    """Greedy blocks decoding through the exact KV cache = recomputing each block with one uncached staircase
    forward over [x_t; x_0] (fp32 on the device)."""
    m = dlm.load(tiny_llama_dir, device=DEVICE, dtype="fp32")
    g = m.generate(PROMPT, decoder="blocks", block_length=4, max_new_tokens=8, steps=8, suppress_eos=True)
    ids = m.tokenizer(PROMPT)["input_ids"]
    P = len(ids)
    canvas = torch.tensor([ids + [m.mask_token_id] * 8], device=DEVICE)
    pad = {m.tokenizer.pad_token_id} if m.tokenizer.pad_token_id is not None else set()
    banned = sorted({m.mask_token_id, *m.eos_token_ids} | pad)
    for b in range(2):
        for _ in range(4):
            with torch.no_grad():
                logits = m.block_denoise_logits(canvas, canvas.clone(), 4, offset=P % 4)[0].float()
            logits[:, banned] = float("-inf")
            probs = logits.softmax(-1)
            window = [p for p in range(P + 4 * b, P + 4 * b + 4) if canvas[0, p] == m.mask_token_id]
            best = max(window, key=lambda p: float(probs[p].max()))
            canvas[0, best] = int(probs[best].argmax())
    assert g.token_ids == canvas[0, P:].tolist()


def test_prefix_cache_equals_uncached(tiny_llama_dir):
    m = dlm.load(tiny_llama_dir, device=DEVICE, dtype="fp32")
    kw = dict(decoder="full", max_new_tokens=8, steps=8, block_length=4, seed=0)
    assert m.generate(PROMPT, use_cache=True, **kw).token_ids == m.generate(PROMPT, use_cache=False, **kw).token_ids


@pytest.mark.parametrize("q", ["8bit", "4bit"])
def test_bitsandbytes_on_the_device(tiny_llama_dir, q):
    pytest.importorskip("bitsandbytes")
    from dlm.loading import quantized_modules
    full = dlm.load(tiny_llama_dir, device=DEVICE, dtype="bf16")
    quant = dlm.load(tiny_llama_dir, device=DEVICE, dtype="bf16", quantization=q)
    assert quantized_modules(quant.base) and next(quant.base.parameters()).device.type == DEVICE.type
    ids = torch.arange(20, 44, device=DEVICE)[None]
    with torch.no_grad():
        a, b = quant.denoise_logits(ids).float(), full.denoise_logits(ids).float()
    assert ((a - b).norm() / b.norm()).item() < {"8bit": 0.05, "4bit": 0.3}[q]
    assert quant.generate(PROMPT, max_new_tokens=6, steps=3, decoder="full", seed=0).token_ids


# ----- training -----------------------------------------------------------------------------------------------------
def _train_overrides(out: Path, cache: Path, *extra: str) -> list[str]:
    return [f"run.output_dir={out}", f"data.cache_dir={cache}", "run.progress=false", "run.tensorboard=false",
            "run.max_steps=4", "run.save_every=2", "run.eval_every=4", "run.mixed_precision=bf16", *extra]


@pytest.mark.parametrize("attention", ["full", "blocks", "mixture"])
def test_training_steps_with_bf16_autocast(tmp_path, attention):
    """Both objectives (the paper's full attention, block diffusion, and their mixture) step under bf16 autocast."""
    from train.config import load_config
    from train.loop import train
    extra = [f"diffusion.attention={attention}"] + (["diffusion.anneal_steps=0", "diffusion.block_lengths=[2,4]"]
                                                    if attention != "full" else [])
    summary = train(load_config("tiny-cpu", _train_overrides(tmp_path / "run", tmp_path / "cache", *extra)))
    assert summary["mixed_precision"] == "bf16" and summary["steps"] == 4
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics if "loss" in r)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def _launch(config: str, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "train" / "accelerate" / config),
           "--num_processes", "1", "--main_process_port", "29517", "-m", "train", "pretrain", "--config", "tiny-cpu",
           *[f"{o}" for o in _train_overrides(out, cache, *extra)]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@needs_cuda
@pytest.mark.parametrize("config", ["single-gpu.yaml", "multi-gpu-ddp.yaml", "fsdp.yaml", "deepspeed-zero2.yaml"])
def test_accelerate_configs_start_and_step(tmp_path, config):
    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    proc = _launch(config, tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 1
