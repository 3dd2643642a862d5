"""The small-row CPU linear (dlm/csrc/small_rows.cpp): right to fp32 rounding, batch-invariant, routed only where it
applies (inference, fp32, CPU, <= 8 rows), and the decoders write the same tokens with it."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlm import cpu_kernel

U = 2.0 ** -24   # fp32 unit roundoff


@pytest.fixture(scope="module")
def kernel():
    if not cpu_kernel.cpu_supports():
        pytest.skip("not an x86-64 CPU with AVX2 + FMA: the kernel does not apply (torch's linear is used)")
    reason = cpu_kernel._build()
    if reason is not None and not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip(f"no C++ compiler: {reason}")
    assert reason is None, f"a compiler is here, so the kernel must build: {reason}"
    return cpu_kernel.small_rows_linear


def _error_bound(x, w, b):
    """Forward error of fp32 dot products of length K, plus the bias add: (K + 2) u (|x| |w|^T + |b|)."""
    mag = x.abs().double() @ w.abs().double().T + (b.abs().double() if b is not None else 0.0)
    return (x.shape[-1] + 2) * U * mag


@pytest.mark.parametrize("rows", range(1, cpu_kernel.MAX_ROWS + 1))
@pytest.mark.parametrize("K,N", [(64, 48), (577, 37), (8, 1), (1536, 200), (5, 130)])
def test_kernel_matches_float64_within_fp32_rounding(kernel, rows, K, N):
    g = torch.Generator().manual_seed(rows * 7919 + K * 31 + N)
    x, w, b = torch.randn(rows, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    for bias in (b, None):
        y = kernel(x, w, bias)
        assert y.shape == (rows, N) and y.dtype == torch.float32
        ref = x.double() @ w.double().T + (bias.double() if bias is not None else 0.0)
        err = (y.double() - ref).abs()
        assert (err <= _error_bound(x, w, bias)).all(), float(err.max())


def test_kernel_rows_do_not_depend_on_their_batch_mates(kernel):
    """Every output is one thread's fixed-order sum, whatever the number of rows: a row computed alone and among
    7 others is bit-identical (so a decoder's verify row equals the AR step's row under the kernel)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 576, generator=g), torch.randn(1000, 576, generator=g)
    together = kernel(x, w, None)
    for i in range(8):
        assert torch.equal(kernel(x[i:i + 1], w, None)[0], together[i])
        assert torch.equal(kernel(x[i:], w, None)[0], together[i])


def test_kernel_takes_batched_and_strided_inputs(kernel):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    x = torch.randn(16, 2, 3, generator=g).permute(1, 2, 0)   # [2, 3, 16], not contiguous
    y = kernel(x, w, b)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="rows"):
        kernel(torch.randn(cpu_kernel.MAX_ROWS + 1, 16), w, b)
    with pytest.raises(RuntimeError, match="fp32"):
        kernel(torch.randn(2, 16, dtype=torch.float64), w.double(), None)


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]   # SmallRowLinear is one too


def test_install_routes_only_small_inference_calls(kernel, tiny_llama_dir, monkeypatch):
    import dlm
    m = dlm.load(tiny_llama_dir, device="cpu", dtype="float32")
    cpu_kernel.uninstall(m.base)
    assert cpu_kernel.installed(m.base) == 0
    ids = torch.randint(10, 500, (1, 6), generator=torch.Generator().manual_seed(2))
    long_ids = torch.randint(10, 500, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, ref_long = m.base(ids).logits, m.base(long_ids).logits

    assert cpu_kernel.install(m.base, force=True) == len(_linears(m.base)) > 0
    assert cpu_kernel.install(m.base, force=True) == 0                        # already routed: idempotent
    calls = []
    real = cpu_kernel.small_rows_linear
    monkeypatch.setattr(cpu_kernel, "small_rows_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        out = m.base(ids).logits
    assert calls and all(s[-2] == 6 for s in calls)                           # 6 rows: every linear on the kernel
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    calls.clear()
    with torch.no_grad():
        out_long = m.base(long_ids).logits                                    # 20 rows: torch's gemm
    assert not calls
    assert torch.equal(out_long, ref_long)

    # training keeps torch's linear (the kernel has no backward) and gets the same gradients
    m.base.zero_grad()
    m.base(ids).logits.float().pow(2).mean().backward()
    assert not calls
    grads = [p.grad.clone() for p in m.base.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    m.base.zero_grad(set_to_none=True)

    assert cpu_kernel.uninstall(m.base) == len(_linears(m.base))
    assert all(type(lin) is nn.Linear and "forward" not in vars(lin) for lin in _linears(m.base))


def test_decoders_write_the_same_tokens_with_the_kernel(kernel, tiny_llama_dir, monkeypatch):
    """Greedy decoding is a chain of argmaxes over logits that differ by ~1e-6 between the two linears: the
    tokens must be the same (speculative, blocks with the cache, and the AR path), and the multi-row steps of the
    diffusion decoders must really run on the kernel."""
    import dlm
    m = dlm.load(tiny_llama_dir, device="cpu", dtype="float32")
    calls = []
    real = cpu_kernel.small_rows_linear
    monkeypatch.setattr(cpu_kernel, "small_rows_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    prompt = "Once upon a time"
    runs = [dict(decoder="speculative", block_length=2), dict(decoder="speculative", block_length=4),
            dict(block_length=4, steps=8)]
    outs = {}
    for routed in (True, False):
        calls.clear()
        if routed:
            cpu_kernel.install(m.base, force=True)
        else:
            cpu_kernel.uninstall(m.base)
        outs[routed] = [m.generate(prompt, max_new_tokens=8, suppress_eos=True, **kw).token_ids for kw in runs]
        assert bool(calls) == routed
        outs[routed].append(m.ar_generate(prompt, max_new_tokens=8, suppress_eos=True).token_ids)
    assert outs[True] == outs[False]


def test_policy_from_the_environment(kernel, tiny_llama_dir, monkeypatch):
    import dlm
    monkeypatch.setenv(cpu_kernel.ENV, "sometimes")
    with pytest.raises(ValueError, match="DLM_CPU_KERNEL='sometimes': allowed are auto, on, off"):
        cpu_kernel.policy()
    monkeypatch.setenv(cpu_kernel.ENV, "off")
    assert not cpu_kernel.wanted()
    assert cpu_kernel.status()["reason"] == "DLM_CPU_KERNEL=off" and not cpu_kernel.status()["routes_small_rows"]
    assert cpu_kernel.installed(dlm.load(tiny_llama_dir, device="cpu", dtype="float32").base) == 0
    monkeypatch.setenv(cpu_kernel.ENV, "on")
    assert cpu_kernel.wanted()
    on = dlm.load(tiny_llama_dir, device="cpu", dtype="float32")
    assert cpu_kernel.installed(on.base) == len(_linears(on.base))
    bf16 = dlm.load(tiny_llama_dir, device="cpu", dtype="bf16")           # not fp32: left alone
    assert cpu_kernel.installed(bf16.base) == 0
    # the explicit argument wins over the environment
    assert cpu_kernel.installed(dlm.load(tiny_llama_dir, device="cpu", cpu_kernel="off").base) == 0
    monkeypatch.setenv(cpu_kernel.ENV, "off")
    assert cpu_kernel.installed(dlm.load(tiny_llama_dir, device="cpu", cpu_kernel="on").base) == len(_linears(on.base))
    with pytest.raises(dlm.LoadError, match="cpu_kernel must be one of auto, on, off, got 'fast'"):
        dlm.load(tiny_llama_dir, device="cpu", cpu_kernel="fast")
    monkeypatch.setenv(cpu_kernel.ENV, "auto")
    assert cpu_kernel.wanted() == (torch.backends.cpu.get_cpu_capability() == "AVX2")
    status = cpu_kernel.status()
    assert status["built"] and status["routes_small_rows"] == cpu_kernel.wanted()


def test_a_killed_build_does_not_hang_the_next_one(kernel, tmp_path):
    """torch's extension builder waits forever on a lock file a killed build left behind; an old one is cleared
    (a fresh process with an empty cache folder: the build runs from scratch)."""
    import os
    import subprocess
    import sys
    import time
    env = {**os.environ, "DLM_CACHE_DIR": str(tmp_path)}
    code = "from dlm import cpu_kernel; print(cpu_kernel.build_directory())"
    directory = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                               check=True).stdout.strip()
    os.makedirs(directory)
    lock = os.path.join(directory, "lock")
    open(lock, "w").close()
    old = time.time() - cpu_kernel.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    code = "from dlm import cpu_kernel; r = cpu_kernel._build(); print('BUILT' if r is None else r)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "BUILT" in done.stdout, (done.stdout + done.stderr)[-2000:]
    assert os.path.exists(os.path.join(directory, "dlm_small_rows.so"))
