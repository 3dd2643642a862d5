"""A small-row fp32 linear for CPUs without AVX-512: what makes a multi-row decoding step cost about one row.

Block-diffusion and speculative decoding run every linear layer on a few rows (a block, plus the drafts it
verifies) where AR decoding runs one. On a CPU one row is memory-bound: MKL's gemv streams the weights once. With
2-8 rows, MKL's AVX2 sgemm path (AMD EPYC, older Xeons: every x86 CPU without AVX-512) costs twice as much, so a
2-row step of SmolLM2-135M cost 1.7x a 1-row step and a decoder needed > 1.7 tokens per step just to break even.
`csrc/small_rows.cpp` reads every weight row once for all (<= 8) rows; measured on the linear layers of SmolLM2
under AVX2 kernels (ms for 30 layers, 1/2/3/4 rows): MKL 20.4 / 40.2 / 41.4 / 42.0, this kernel 19.8 / 21.7 /
23.2 / 24.4. On AVX-512 CPUs MKL's own small-row path is as fast, so "auto" leaves them alone.

Policy: the environment variable DLM_CPU_KERNEL = "auto" (default: on where torch's CPU capability is AVX2) /
"on" (any x86 CPU with AVX2 + FMA) / "off", or `dlm.load(cpu_kernel=...)` per model. `dlm.load` calls `install`,
which swaps `SmallRowLinear` in for the plain fp32 CPU nn.Linear layers; only 2-8 row
calls are routed, so an AR step (one row) runs torch's linear either way. The kernel is compiled once on first use with
torch.utils.cpp_extension (a C++ compiler and ninja; ~15 s, cached in dlm's cache folder, $DLM_CACHE_DIR or
~/.cache/dlm-studio, under kernels/); without them, or
on other CPUs, everything stays on torch's own linear and nothing else changes.

    dlm kernel          # build it now and print which path this machine takes
"""
from __future__ import annotations

import functools
import os
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS, MAX_ROWS = 2, 8        # 1 row stays on MKL's gemv (already at memory speed; the AR step is untouched);
                                 # more than 8 go to torch too (MKL's gemm is good there)
ENV = "DLM_CPU_KERNEL"
POLICIES = ("auto", "on", "off")
SOURCE = Path(__file__).with_name("csrc") / "small_rows.cpp"


def policy() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in POLICIES:
        raise ValueError(f"{ENV}={value!r}: allowed are {', '.join(POLICIES)}")
    return value


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.partition(":")[2].split())


def native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively (without them they are emulated and slower than fp32)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def cpu_supports() -> bool:
    """x86-64 with AVX2 and FMA (what the kernel is compiled for)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return True   # ATen's AVX2 dispatch itself requires AVX2 + FMA
    return {"avx2", "fma"} <= cpu_flags()


def wanted(policy_value: Optional[str] = None) -> bool:
    """Whether small-row linears should go to the kernel under `policy_value` (default: $DLM_CPU_KERNEL) on this CPU
    (not yet built)."""
    p = policy() if policy_value is None else policy_value
    if p not in POLICIES:
        raise ValueError(f"cpu_kernel={p!r}: allowed are {', '.join(POLICIES)}")
    if p == "off" or not cpu_supports():
        return False
    return p == "on" or torch.backends.cpu.get_cpu_capability() == "AVX2"


STALE_LOCK_S = 600                # a build lock older than this was left by a killed build (one takes ~15 s)


def build_directory() -> Path:
    """Where the compiled kernel lives: dlm's cache folder, one subfolder per torch / Python version."""
    from .fileio import cache_dir
    tag = f"torch{torch.__version__.split('+')[0]}-py{platform.python_version_tuple()[0]}{platform.python_version_tuple()[1]}"
    return cache_dir() / "kernels" / f"small_rows-{tag}"


@functools.lru_cache(maxsize=1)
def _build() -> Optional[str]:
    """Compile and load the op once per process; returns None on success, else why it is unavailable."""
    try:
        from torch.utils.cpp_extension import load
        if shutil.which("ninja") is None:   # the `ninja` wheel's binary, when the venv's bin/ is not on PATH
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / "lock"            # torch waits on this file forever if a build was killed (kill -9)
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        load(name="dlm_small_rows", sources=[str(SOURCE)], is_python_module=False, verbose=False,
             build_directory=str(directory),
             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
        torch.ops.dlm_cpu.small_rows_linear   # noqa: B018  (raises if the library did not register)
        return None
    except Exception as e:  # no compiler / ninja / headers: degrade to torch's linear
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]


def available() -> bool:
    """Build (once) and report whether the kernel can run here; warns once with the reason when it cannot."""
    if not cpu_supports():
        return False
    reason = _build()
    if reason is not None:
        _warn_once(reason)
    return reason is None


@functools.lru_cache(maxsize=1)
def _warn_once(reason: str) -> None:
    warnings.warn(f"dlm: the small-row CPU kernel could not be built ({reason}); using torch's linear "
                  f"(set {ENV}=off to skip the attempt)", RuntimeWarning, stacklevel=3)


def small_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T + bias for <= MAX_ROWS rows of x (fp32, CPU, no autograd)."""
    rows = x.numel() // x.shape[-1]
    y = torch.ops.dlm_cpu.small_rows_linear(x.reshape(rows, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class SmallRowLinear(nn.Linear):
    """An nn.Linear whose 2-8 row fp32 CPU inference calls run on the kernel; everything else (one row, many rows,
    training: the kernel has no backward) on torch's linear. `install` swaps it in for plain nn.Linear modules,
    sharing their parameters, so weights, state dicts and tied parameters are untouched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if (MIN_ROWS <= rows <= MAX_ROWS and x.dtype == self.weight.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return small_rows_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _routable(module: nn.Module) -> bool:
    # exactly nn.Linear: quantized subclasses (bitsandbytes) and LoRA wrappers compute something else
    return type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"


def _swap(model: nn.Module, select, cls: type) -> int:
    """Give every module `select` accepts the class `cls` (nn.Linear <-> SmallRowLinear: same fields, so the
    parameters, buffers, hooks and ties stay exactly as they are); returns how many were swapped."""
    n = 0
    for module in model.modules():
        if select(module):
            module.__class__ = cls
            n += 1
    return n


def install(model: nn.Module, policy_value: Optional[str] = None, force: Optional[bool] = None) -> int:
    """Swap `SmallRowLinear` in for every plain fp32 CPU nn.Linear of `model` when the kernel is wanted.

    policy_value: auto / on / off (default $DLM_CPU_KERNEL, see `wanted`); force: True / False overrides it.
    Returns how many layers were swapped (0 when the kernel is not wanted or cannot be built here)."""
    if not (wanted(policy_value) if force is None else force) or not available():
        return 0
    return _swap(model, _routable, SmallRowLinear)


def uninstall(model: nn.Module) -> int:
    """Undo `install` (plain nn.Linear again); returns how many layers were restored."""
    return _swap(model, lambda m: type(m) is SmallRowLinear, nn.Linear)


def installed(model: nn.Module) -> int:
    return sum(type(m) is SmallRowLinear for m in model.modules())


def describe(model: nn.Module) -> str:
    """Which linear a model's small-row calls run on, for benchmark headers: the kernel or torch's (MKL ...)."""
    from .packed_linear import kernel_path, packed_modules
    n = installed(model)
    cap = torch.backends.cpu.get_cpu_capability()
    packed = packed_modules(model)
    head = (", ".join(f"{k} x{v}" for k, v in packed.items()) + f" on dlm's packed kernel ({kernel_path()} path); "
            ) if packed else ""
    return head + (f"dlm small-row kernel for {MIN_ROWS}-{MAX_ROWS} rows ({n} layers), else torch ({cap})" if n else
                   f"torch ({cap})")


def status() -> dict:
    """What this machine does (builds the kernel if it applies and the policy is not off): for `dlm kernel`."""
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "policy": policy(),
           "cpu_supports": cpu_supports(), "built": False, "reason": None}
    if not out["cpu_supports"]:
        out["reason"] = "not an x86-64 CPU with AVX2 + FMA"
    elif out["policy"] == "off":
        out["reason"] = f"{ENV}=off"
    else:
        out["reason"] = _build()
        out["built"] = out["reason"] is None
    out["routes_small_rows"] = bool(out["built"] and wanted())
    return out
