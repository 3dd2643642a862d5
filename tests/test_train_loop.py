"""train/loop.py end to end on the tiny-cpu preset: learning, schedules, ablation switches, exact resume after
SIGKILL, corrupt-checkpoint fallback, LoRA export, and a 2-process CPU data-parallel run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.config import ConfigError, load_config
from train.loop import anneal_ratio, make_scheduler, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))


def _overrides(out: Path, cache_dir: str, *extra: str) -> list[str]:
    return [f"run.output_dir={out}", f"data.cache_dir={cache_dir}", "run.progress=false",
            "run.tensorboard=false", *extra]


def _run(out, cache_dir, *extra, task="pretrain"):
    return train(load_config("tiny-cpu", _overrides(out, cache_dir, *extra)), task)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


# ----- schedules ------------------------------------------------------------------------------------------------------
def test_anneal_ratio_follows_the_schedule():
    assert [anneal_ratio(s, 4) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert anneal_ratio(0, 0) == 1.0 and anneal_ratio(123, 0) == 1.0  # annealing off: bidirectional at once


def test_lr_warmup_then_cosine():
    def factors(schedule="cosine", steps=15):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_scheduler(opt, warmup_steps=4, max_steps=14, schedule=schedule, min_lr_ratio=0.1)
        out = []
        for _ in range(steps):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out
    f = factors()
    assert f[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])     # transformers' linear warmup
    assert f[9] == pytest.approx(0.55) and f[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert factors("constant")[4:] == pytest.approx([1.0] * 11)


# ----- learning and export --------------------------------------------------------------------------------------------
def test_loss_falls_and_the_export_is_the_trained_model(tmp_path, cache_dir):
    out = tmp_path / "run"
    summary = _run(out, cache_dir, "run.max_steps=30", "run.save_every=30", "run.eval_every=0",
                   "run.log_every=5")
    logs = [m for m in _metrics(out) if "masked_ce" in m]
    assert logs[-1]["masked_ce"] < logs[0]["masked_ce"] - 0.5, logs      # ~6.8 -> ~5.5 nats
    evals = [m for m in _metrics(out) if "eval/acc@0.5" in m]
    assert [e["step"] for e in evals] == [0, 30]                           # before training and at the end
    assert {"eval/acc@0.15", "eval/acc@0.9", "eval/elbo_ppl"} <= set(evals[-1])
    assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 8 * 64 and summary["tokens_per_s"] > 0

    from train.curve import main as curve_main
    from train.curve import markdown, read_metrics
    ev, tr = read_metrics(out)
    table = markdown(ev).splitlines()
    assert table[0].startswith("| step | tokens | acc@0.15 | acc@0.5 | acc@0.9 | elbo_ppl")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["0", "30"] and len(tr) == 6
    assert curve_main([str(out), "--html", str(tmp_path / "curve.html")]) == 0
    assert "plotly" in (tmp_path / "curve.html").read_text()[:200000].lower()
    assert curve_main([str(tmp_path / "nope")]) == 2

    import dlm
    model = dlm.load(out / "final", device="cpu", dtype="float32")
    assert model.shift and model.mask_token_id == model.tokenizer.mask_token_id and model.config.adapted
    assert model.config.training["steps"] == 30
    ckpt = load_file(str(out / "checkpoints" / "step-30" / "model.safetensors"))
    final = model.base.state_dict()
    for key, value in ckpt.items():
        assert torch.equal(final[key[len("model.base."):]], value), key
    init = load_file(str(out / "init-model" / "model.safetensors"))
    assert not torch.equal(init["model.layers.0.mlp.up_proj.weight"], final["model.layers.0.mlp.up_proj.weight"])


def test_ablation_switches_reach_the_objective(tmp_path, cache_dir, monkeypatch):
    import dlm
    calls = []
    real = dlm.DiffusionLM.diffusion_loss

    def spy(self, input_ids, **kw):
        calls.append({"ratio": kw["attention_mask_ratio"], "weighting": kw["weighting"], "shift": self.shift})
        return real(self, input_ids, **kw)

    monkeypatch.setattr(dlm.DiffusionLM, "diffusion_loss", spy)
    out = tmp_path / "ablate"
    _run(out, cache_dir, "run.max_steps=5", "run.save_every=0", "run.eval_batches=0", "diffusion.anneal_steps=2",
         "diffusion.weighting=none", "model.shift=false", "run.grad_accum=2")
    assert [c["ratio"] for c in calls] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert {c["weighting"] for c in calls} == {"none"} and {c["shift"] for c in calls} == {False}
    assert json.loads((out / "final" / "dlm_config.json").read_text())["shift"] is False
    calls.clear()
    summary = _run(tmp_path / "ar", cache_dir, "run.max_steps=3", "run.save_every=0", "run.eval_batches=0",
                   "diffusion.objective=ar")
    assert calls == [] and summary["objective"] == "ar" and summary["tokens_per_s"] > 0


def test_max_minutes_ends_the_run_early_with_its_checkpoint_and_export(tmp_path, cache_dir):
    """A time-boxed run (the GPU runbook's) stops at the deadline as it would at max_steps: final checkpoint,
    evaluation and export, and a summary that says how far it got."""
    summary = _run(tmp_path / "boxed", cache_dir, "run.max_minutes=0.0001", "run.max_steps=40", "run.save_every=40")
    assert 1 <= summary["steps"] < 40
    assert (tmp_path / "boxed" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "boxed" / "checkpoints" / f"step-{summary['steps']}").is_dir()
    with pytest.raises(ConfigError, match="run.max_minutes"):
        load_config("tiny-cpu", ["run.max_minutes=-1"])


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path, cache_dir):
    out = tmp_path / "run"
    _run(out, cache_dir, "run.max_steps=2", "run.save_every=1", "run.eval_batches=0")
    with pytest.raises(ConfigError, match="--resume auto"):
        _run(out, cache_dir, "run.max_steps=4", "run.eval_batches=0")


# ----- faults ---------------------------------------------------------------------------------------------------------
def _final_weights(out: Path) -> dict:
    return load_file(str(out / "final" / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-for-bit: CPU, 1 thread, same op order


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, cache_dir):
    common = ["--config", "tiny-cpu", "--max-steps", "12", "--save-every", "4", "run.eval_every=4",
              f"data.cache_dir={cache_dir}", "run.progress=false", "run.tensorboard=false"]
    # the reference runs in this process (same code, same thread count: bit-identical, and faster)
    _run(tmp_path / "ref", cache_dir, "run.max_steps=12", "run.save_every=4", "run.eval_every=4")

    out = tmp_path / "killed"
    # the victim is slowed by a train() callback (the public hook), so the kill lands part-way through a run
    script = ("import sys, time\nfrom train.config import load_config\n"
              "from train.loop import train\nclass Slow:\n    def on_step_end(self, step, record):\n"
              "        time.sleep(0.25)\nargs = sys.argv[1:]\n"
              "train(load_config('tiny-cpu', args), 'pretrain', callbacks=[Slow()])\n")
    victim = subprocess.Popen([sys.executable, "-c", script, "run.max_steps=12", "run.save_every=4",
                               "run.eval_every=4", f"data.cache_dir={cache_dir}", "run.progress=false",
                               "run.tensorboard=false", f"run.output_dir={out}"], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-4").is_dir():
        assert victim.poll() is None, victim.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.6)                                  # killed part-way through the steps after the checkpoint
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not (out / "final").exists()
    done_steps = [m["step"] for m in _metrics(out) if "loss" in m]
    assert 4 <= max(done_steps) < 12

    resumed = _cli(["pretrain", *common, "--output-dir", str(out), "--resume", "auto"])
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "resumed from step" in log
    _assert_same_weights(_final_weights(tmp_path / "ref"), _final_weights(out))
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("time", "tokens_per_s")} for m in ms]  # noqa: E731
    assert strip(_metrics(out)) == strip(_metrics(tmp_path / "ref"))  # the curve has no duplicated steps


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, cache_dir, caplog):
    ref = tmp_path / "ref"
    _run(ref, cache_dir, "run.max_steps=8", "run.save_every=2", "run.keep_last=4", "run.eval_batches=0")
    out = tmp_path / "run"
    _run(out, cache_dir, "run.max_steps=8", "run.save_every=2", "run.keep_last=4", "run.eval_batches=0")
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-4", "step-6", "step-8"]
    import shutil
    shutil.rmtree(ckpts / "step-8")                                      # as if killed before saving step 8
    shutil.rmtree(out / "final")
    weights = ckpts / "step-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])   # truncated newest checkpoint
    (ckpts / ".tmp-step-8").mkdir()                                       # a save interrupted half-way
    (ckpts / ".tmp-step-8" / "model.safetensors").write_bytes(b"garbage")
    with caplog.at_level("WARNING"):
        summary = _run(out, cache_dir, "run.max_steps=8", "run.save_every=2", "run.keep_last=4",
                       "run.eval_batches=0", "run.resume=auto")
    assert summary["resumed_from"].endswith("step-4")
    assert any("step-6" in r.message and "falling back" in r.message for r in caplog.records)
    assert not (ckpts / ".tmp-step-8").exists()
    _assert_same_weights(_final_weights(ref), _final_weights(out))


# ----- LoRA -----------------------------------------------------------------------------------------------------------
def test_lora_trains_the_mask_row_and_exports_an_adapter_dlm_load_accepts(tmp_path, cache_dir):
    import dlm
    out = tmp_path / "lora"
    _run(out, cache_dir, "lora.enabled=true", "lora.r=4", "run.max_steps=6", "run.save_every=3",
         "run.eval_batches=0", "optim.lr=1e-2")
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    cfg = json.loads((final / "dlm_config.json").read_text())
    assert cfg["base_model"] == str(out / "init-model")

    a = dlm.load(final, device="cpu", dtype="float32")
    b = dlm.load(out / "init-model", adapter=final, device="cpu", dtype="float32")
    base = dlm.load(out / "init-model", device="cpu", dtype="float32")
    x = torch.randint(2, 500, (2, 24))
    with torch.no_grad():
        la, lb, l0 = a.denoise_logits(x), b.denoise_logits(x), base.denoise_logits(x)
    assert torch.allclose(la, lb) and not torch.allclose(la, l0)
    mask = a.mask_token_id
    ea, e0 = a.base.get_input_embeddings().weight, base.base.get_input_embeddings().weight
    assert not torch.equal(ea[mask], e0[mask])                      # the [MASK] row was trained
    others = torch.ones(ea.shape[0], dtype=torch.bool)
    others[mask] = False
    assert torch.equal(ea[others], e0[others])                      # no other embedding row changed

    # shipping it as an asset: in fp32 exactly the exported model; in bf16 half the adapter bytes. (This tiny model
    # trained at lr 1e-2 is very sensitive to weight rounding: bf16 moves its logits by ~0.35, fp16 by ~0.03; on
    # the real SmolLM2 asset bf16 moved them by 0.03 on a scale of 33 with identical argmax.)
    from train.ship import ship
    asset, asset16 = tmp_path / "assets" / "tiny-dlm", tmp_path / "assets" / "tiny-dlm-bf16"
    ship(final, asset, dtype="float32")
    shipped = dlm.load(asset, device="cpu", dtype="float32")
    with torch.no_grad():
        assert torch.equal(shipped.denoise_logits(x), la)
    ship(final, asset16, dtype="bfloat16")
    w32, w16 = (d / "adapter_model.safetensors" for d in (asset, asset16))
    assert w16.stat().st_size < 0.55 * w32.stat().st_size
    with torch.no_grad():
        assert not torch.allclose(dlm.load(asset16, device="cpu", dtype="float32").denoise_logits(x), l0)
    with pytest.raises(ValueError, match="max-mb"):                 # an oversize asset is refused ...
        ship(final, asset, max_mb=1e-4)
    assert (asset / "adapter_model.safetensors").is_file()          # ... and the shipped one stays intact
    with pytest.raises(ValueError, match="not a LoRA export"):
        ship(out / "init-model", tmp_path / "assets" / "nope")
    # the recommended decoding ships with it and becomes the loaded model's default (and survives a re-ship)
    ship(final, asset, dtype="float32", generate={"decoder": "blocks", "block_length": "4", "threshold": "0.9"},
         infill={"steps": "8"})
    ship(final, asset, dtype="float32")
    loaded = dlm.load(asset, device="cpu", dtype="float32")
    assert (loaded.sampler_config.decoder, loaded.sampler_config.block_length) == ("blocks", 4)
    assert loaded.sampler_config.threshold == 0.9 and loaded.infill_config.steps == 8
    with pytest.raises(ValueError, match="block_length: the blocks decoder needs a block size"):
        ship(final, asset, generate={"decoder": "blocks"})

    # a LoRA run resumes exactly too: drop the tail of this run and resume it from its step-3 checkpoint
    import shutil
    expected = load_file(str(final / "adapter_model.safetensors"))
    shutil.rmtree(out / "checkpoints" / "step-6")
    shutil.rmtree(final)
    _run(out, cache_dir, "lora.enabled=true", "lora.r=4", "run.max_steps=6", "run.save_every=3",
         "run.eval_batches=0", "optim.lr=1e-2", "run.resume=auto")
    _assert_same_weights(expected, load_file(str(final / "adapter_model.safetensors")))


# ----- data parallel --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_run_completes_and_ranks_agree(tmp_path, cache_dir):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "train" / "accelerate" / "cpu-2proc.yaml"), "--main_process_port", str(_free_port()),
           "-m", "train", "pretrain", "--config", "tiny-cpu", "--output-dir", str(out), "--max-steps", "6",
           "--save-every", "3", "run.eval_every=3", f"data.cache_dir={cache_dir}", "run.progress=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens_seen"] == 6 * 2 * 8 * 64
    assert len(summary["rank_checksums"]) == 2 and summary["ranks_agree"]
    assert (out / "checkpoints" / "step-6" / "rank_state_1.pt").is_file()  # per-rank noise state saved
    assert (out / "final" / "model.safetensors").is_file()


def test_snapshots_and_an_adapter_over_an_adapter_dlm(tmp_path, cache_dir):
    """run.export_every writes loadable snapshots (the last equals the final export); an adapter export holds no
    frozen copy of the resized embedding; a second LoRA stage over an adapter-only DLM (GSM8K SFT over the shipped
    DLM) exports an adapter whose base_model is that DLM, and dlm.load follows the chain; an AR-objective stage
    exports a model that loads as AR."""
    import dlm
    from evals.eval_model import default_kind
    from train.ship import FROZEN_COPY
    lora = ("lora.enabled=true", "lora.r=4", "run.save_every=0", "run.eval_batches=0", "optim.lr=1e-2")
    first = tmp_path / "first"
    _run(first, cache_dir, *lora, "run.max_steps=4", "run.export_every=2")
    assert sorted(p.name for p in (first / "exports").iterdir()) == ["step-2", "step-4"]
    assert not [k for k in load_file(str(first / "final" / "adapter_model.safetensors")) if k.endswith(FROZEN_COPY)]
    x = torch.randint(2, 500, (2, 24))
    load = lambda d, **kw: dlm.load(d, device="cpu", dtype="float32", **kw)   # noqa: E731
    with torch.no_grad():
        l_first = load(first / "final").denoise_logits(x)
        assert torch.equal(load(first / "exports" / "step-4").denoise_logits(x), l_first)
        assert not torch.allclose(load(first / "exports" / "step-2").denoise_logits(x), l_first)

    def stage(out, source, *extra):   # the tiny-cpu run's data and shapes, starting from `source`
        return train(load_config(None, _overrides(out, cache_dir, *lora, f"model.source={source}",
                                                  "model.dtype=float32", "data.sources=[train/data/tiny_corpus.txt]",
                                                  "data.block_size=64", "run.batch_size=8", "run.threads=1",
                                                  "optim.warmup_steps=1", "diffusion.anneal_steps=0", *extra)),
                     "pretrain")

    second = tmp_path / "second"
    stage(second, first / "final", "run.max_steps=3")
    assert json.loads((second / "final" / "dlm_config.json").read_text())["base_model"] == str(first / "final")
    with torch.no_grad():
        stacked = load(second / "final")
        l_second = stacked.denoise_logits(x)
        assert torch.equal(load(first / "final", adapter=second / "final").denoise_logits(x), l_second)
        assert not torch.allclose(l_second, l_first)
    assert default_kind(stacked) == "dlm"

    ar = tmp_path / "ar"
    stage(ar, first / "init-model", "run.max_steps=2", "diffusion.objective=ar")
    assert default_kind(load(ar / "final")) == "ar"
