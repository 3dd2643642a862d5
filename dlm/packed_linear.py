"""Weight-only int8 / int4 linears for CPUs: the weights read once per step in 8.5 or 5 bits instead of 32.

A decoding step on a CPU is memory-bound: its floor is the weight bytes over the memory bandwidth, and a few rows
(a DLM block, drafts to verify) cost about what one row does when every weight is unpacked once for all of them.
`dlm.load(..., quantization="int8" | "int4")` swaps `PackedLinear` in for every linear layer of a CPU model, the
output head included (a decoding step reads it for the rows it decides; the input embedding stays an fp32 lookup):

  int8  blocks of 32 weights along the input dimension, one fp16 scale each: w = q * d, q in -127..127
        (GGUF's Q8_0 layout; 8.5 bits a weight)
  int4  blocks of 32 weights, an fp16 scale and minimum each: w = q * d + m, q in 0..15 (GGUF's Q4_1; 5 bits a
        weight). The output head is stored as int8 (as the GGUF stores it): at 49k rows it is a quarter of
        SmolLM2's weights, and its rounding moves every logit.

The default model *is* a Q4_1 GGUF (int4 linears, Q8_0 embedding / head), dequantized to fp32 on load: packing it as
int4 gives back exactly the GGUF's weights (same blocks, scales and minima), so its weights cost no quality against
fp32 (the activations' rounding, below, is what remains); int8 re-rounds those weights onto a finer grid. For other
models both formats' weights are lossy.

The activations are quantized too, as llama.cpp does for these formats: each row per block of 32 as int8 with one
fp32 scale (`quantize_activations`), so a block's 32 products are integer multiply-adds (AVX-512 VNNI's vpdpbusd, 64
per instruction; AVX2's vpmaddubsw) and one fp32 FMA: `y = x^ @ dequant(W)^T + b` with x^ the quantized rows
(`reference_matmul`). With fp32 activations the kernel was compute-bound at 2.6x its memory floor for one row and
5-8x for 4-8 rows on a 2-core Xeon; quantizing moves each activation by at most half its block's step (max|x| / 254)
and SmolLM2's logits by ~3% (top-1 unchanged; docs/method.md). The weights are stored tile-major (16 output rows
interleaved, `tile`), so a vector's lanes are 16 outputs and no block needs a horizontal sum. The matmul is
`dlm/csrc/packed_rows.cpp` (compiled on first use like `dlm.cpu_kernel`): portable C++, AVX2 + FMA + F16C and
AVX-512 VNNI paths, picked by torch's CPU capability (so `ATEN_CPU_CAPABILITY=default / avx2` selects them as it
does torch's own); every path does the same fp32 operations on exact integer block sums, so they agree bit for bit.
Every row goes to the kernel, a long prefill's too: a row's result never depends on how many rows share the call,
so a prompt's keys are what 1-row steps would compute (exact speculative decoding compares the two; with int8 rows a
last-bit difference upstream can round an activation to the next step). Anything needing gradients (a LoRA trained
on a packed base) runs `F.linear` on the dequantized weight with fp32 activations, as does every call where the
kernel cannot be built (no compiler: slow but right).

torch's own `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` exist in torch 2.13 but took 17-40x their
memory floor with fp32 activations on SmolLM2's shapes (2-core Xeon); `python -m bench.linear_kernels` times them.
"""
from __future__ import annotations

import functools
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("int8", "int4")
BITS = {"int8": 8, "int4": 4}
BLOCK = 32                  # weights per packed block; a group (one scale) is a multiple of it
TILE = 16                   # weight rows interleaved in the kernel's layout (csrc/packed_rows.cpp: kTile)
DEFAULT_GROUP = 32          # GGUF's Q8_0 / Q4_1 block: packing the default model's GGUF weights is exact
PATHS = {"default": 0, "avx2": 1, "avx512": 2}
SOURCE = Path(__file__).with_name("csrc") / "packed_rows.cpp"


# ----- formats ------------------------------------------------------------------------------------------------------
def _tile_permute(buf: torch.Tensor, units: int, inverse: bool = False) -> torch.Tensor:
    """Row-major [N, L] <-> tile-major: within each tile of TILE rows (the last may be narrower), the [rows, L / units,
    units] block transposed to [L / units, rows, units] (same bytes, same shape; slicing or concatenating whole tiles
    along N keeps the format)."""
    n, length = buf.shape
    full = n // TILE * TILE
    out = torch.empty_like(buf)
    for start, stop, width in ((0, full, TILE), (full, n, n - full)):
        if stop > start:
            shape = (-1, length // units, width, units) if inverse else (-1, width, length // units, units)
            out[start:stop] = buf[start:stop].reshape(shape).transpose(1, 2).reshape(stop - start, length)
    return out


def tile(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major packed buffers -> the kernel's tile-major ones (csrc/packed_rows.cpp's header: per tile of 16 rows,
    weights [block][chunk of 4 bytes][row], scales [group][(d, m)][row])."""
    return _tile_permute(qweight, 4), _tile_permute(scales.reshape(scales.shape[0], -1), 1).reshape(scales.shape)


def untile(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `tile`."""
    return (_tile_permute(qweight, 4, inverse=True),
            _tile_permute(scales.reshape(scales.shape[0], -1), 1, inverse=True).reshape(scales.shape))


def quantize(weight: torch.Tensor, bits: int, group: int = DEFAULT_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack an fp weight [N, K] (K a multiple of `group`, `group` of 32): int8 -> (int8 [N, K], fp16 scales
    [N, K / group]); int4 -> (uint8 [N, K / 2], fp16 [N, K / group, 2] = scale, minimum), both tile-major (`tile`).
    Round to nearest with the fp16-rounded scales, so `dequantize` gives each weight within half a step of its
    input. Row-major, int8 is GGUF's Q8_0 block and int4 its Q4_1 (byte j of a block: weight j in the low nibble,
    j + 16 in the high one)."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if group % BLOCK or group <= 0:
        raise ValueError(f"group must be a positive multiple of {BLOCK}, got {group}")
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    if k % group:
        raise ValueError(f"in_features {k} is not a multiple of the group {group}")
    wg = w.reshape(n, k // group, group)
    if bits == 8:
        d = (wg.abs().amax(-1) / 127).to(torch.float16)
        df = d.float()
        inv = torch.where(df > 0, 1.0 / df, torch.zeros_like(df))
        q = torch.round(wg * inv[..., None]).clamp_(-127, 127).to(torch.int8)
        return tile(q.reshape(n, k).contiguous(), d.contiguous())
    lo, hi = wg.amin(-1), wg.amax(-1)
    m = lo.to(torch.float16)
    d = ((hi - lo) / 15).to(torch.float16)
    df, mf = d.float(), m.float()
    inv = torch.where(df > 0, 1.0 / df, torch.zeros_like(df))
    q = torch.round((wg - mf[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(n, k // BLOCK, BLOCK)
    packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2)
    return tile(packed.contiguous(), torch.stack([d, m], -1).contiguous())


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group: int = DEFAULT_GROUP) -> torch.Tensor:
    """The fp32 weight [N, K] a packed (tile-major) weight stands for."""
    qweight, scales = untile(qweight, scales)
    n = qweight.shape[0]
    if bits == 8:
        k = qweight.shape[1]
        return (qweight.float().reshape(n, k // group, group) * scales.float()[..., None]).reshape(n, k)
    k = qweight.shape[1] * 2
    b = qweight.reshape(n, k // BLOCK, 16)
    q = torch.cat([b & 15, b >> 4], -1).float().reshape(n, k // group, group)
    s = scales.float()
    return (q * s[..., 0, None] + s[..., 1, None]).reshape(n, k)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activations: each row of x [..., K] per block of 32 as int8 q (-127..127) and an fp32 scale d =
    max|x| / 127, q = round(x / d) (x * (1 / d), ties to even): (q [..., K] int8, d [..., K / 32])."""
    xb = x.detach().to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None]).clamp_(-127, 127)
    return q.to(torch.int8).reshape(x.shape), d


def reference_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                     bits: int, group: int = DEFAULT_GROUP) -> torch.Tensor:
    """What the kernel computes, in float64: x^ @ dequant(W)^T + bias, x^ = q * d the quantized activations
    (`quantize_activations`). The kernel rounds once per block term (tests/test_packed_linear.py bounds it)."""
    q, d = quantize_activations(x)
    xh = (q.double().reshape(*d.shape, BLOCK) * d.double()[..., None]).reshape(x.shape)
    y = xh @ dequantize(qweight, scales, bits, group).double().T
    return y if bias is None else y + bias.double()


def packed_bytes(bits: int, n: int, k: int, group: int = DEFAULT_GROUP) -> int:
    return n * k * bits // 8 + n * (k // group) * 2 * (2 if bits == 4 else 1)


# ----- the compiled kernel ------------------------------------------------------------------------------------------
def build_directory() -> Path:
    from .cpu_kernel import build_directory as small_rows_dir
    return small_rows_dir().with_name(small_rows_dir().name.replace("small_rows", "packed_rows"))


@functools.lru_cache(maxsize=1)
def _build() -> Optional[str]:
    """Compile and load the op once per process; None on success, else why it is unavailable."""
    try:
        from torch.utils.cpp_extension import load
        if shutil.which("ninja") is None:
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > 600:
            lock.unlink(missing_ok=True)
        load(name="dlm_packed_rows", sources=[str(SOURCE)], is_python_module=False, verbose=False,
             build_directory=str(directory), extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
        torch.ops.dlm_packed.packed_linear   # noqa: B018  (raises if the library did not register)
        return None
    except Exception as e:  # no compiler / ninja / headers: torch's matmul on dequantized weights
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]


def available() -> bool:
    """Build (once) and say whether the packed kernel runs here; warns once with the reason when it cannot."""
    if os.environ.get("DLM_CPU_KERNEL", "").strip().lower() == "off":
        return False
    reason = _build()
    if reason is not None:
        _warn_once(reason)
    return reason is None


@functools.lru_cache(maxsize=1)
def _warn_once(reason: str) -> None:
    warnings.warn(f"dlm: the packed int8/int4 CPU kernel could not be built ({reason}); packed layers run torch's "
                  "matmul on dequantized weights (correct, several times slower)", RuntimeWarning, stacklevel=3)


def kernel_path() -> str:
    """The SIMD path for this process: torch's CPU capability (ATEN_CPU_CAPABILITY lowers it), F16C for AVX2."""
    from .cpu_kernel import cpu_flags
    cap = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    if cap == "AVX512" and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"} <= flags:
        return "avx512"   # VNNI's vpdpbusd; AVX-512 CPUs without it (Skylake-X) take the AVX2 path
    if cap in ("AVX2", "AVX512") and {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "default"


@functools.lru_cache(maxsize=1)
def _path_code() -> int:
    return PATHS[kernel_path()]


def packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                  bits: int, group: int = DEFAULT_GROUP, path: Optional[str] = None) -> torch.Tensor:
    """x^ @ dequant(W)^T + bias on the kernel (fp32 CPU x, quantized per row and block of 32 inside; no autograd);
    `path` forces a SIMD path. `reference_matmul` is the same product in float64."""
    reason = _build()
    if reason is not None:
        raise RuntimeError(f"the packed kernel is unavailable: {reason}")
    code = _path_code() if path is None else PATHS[path]
    return torch.ops.dlm_packed.packed_linear.default(x, qweight, scales, bias, bits, group, code)


_FAST: Optional[tuple] = None   # (the op, the path code, the LoRA op) once the kernel is known to run here; ()
                                # where it does not


def _fast() -> tuple:
    """The ops and path for PackedLinear.forward, decided once per process (the hot path skips every other check)."""
    global _FAST
    if _FAST is None:
        ops = torch.ops.dlm_packed
        _FAST = (ops.packed_linear.default, _path_code(), ops.packed_linear_lora.default) if available() else ()
    return _FAST


def row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float
                  ) -> Optional[torch.Tensor]:
    """Attention whose every row depends only on its own query and allowed keys (csrc/packed_rows.cpp): q [B, H, Q,
    D], k / v [B, Hkv, K, D] fp32 CPU, mask bool [B or 1, 1, Q, K] (True = may attend) or None (causal, the rows
    the last Q positions) -> [B, Q, H, D]; None where the kernel does not run here."""
    fast = _FAST if _FAST is not None else _fast()
    if not fast:
        return None
    return torch.ops.dlm_packed.row_attention.default(q, k, v, mask, float(scale), fast[1])


def nucleus_filter(scores: torch.Tensor, probs: torch.Tensor, top_p: float, min_keep: int, filter_value: float
                   ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Top-p filtering of scores [N, V] fp32 CPU (probs their softmax) without sorting the vocabulary (csrc/
    packed_rows.cpp): (filtered scores, decided [N]; an undecided row is left as it was, for a full sort), or None
    where the kernel does not run here. `dlm.token_sampling.nucleus_warper` is its caller."""
    fast = _FAST if _FAST is not None else _fast()
    if not fast:
        return None
    return torch.ops.dlm_packed.nucleus_filter.default(scores, probs, float(top_p), int(min_keep), float(filter_value))


# ----- the module ---------------------------------------------------------------------------------------------------
class PackedLinear(nn.Module):
    """A linear layer with packed int8 / int4 weights (buffers `qweight`, `scales`; `bias` fp32 when the layer has
    one). Inference calls on fp32 rows run the packed kernel (`packed_matmul`); anything else torch's linear on the
    dequantized weights with fp32 activations (autograd flows to the input, so a LoRA on top trains). Under a peft
    LoRA layer it is the `base_layer` (peft finds its device in `qweight`)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group: int = DEFAULT_GROUP,
                 bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        rb = in_features if bits == 8 else in_features // 2
        self.register_buffer("qweight", torch.zeros(out_features, rb, dtype=torch.int8 if bits == 8 else torch.uint8))
        shape = (out_features, in_features // group) + ((2,) if bits == 4 else ())
        self.register_buffer("scales", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                    group: int = DEFAULT_GROUP) -> "PackedLinear":
        """From an fp weight [out, in] (nn.Linear's layout) and an optional bias."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bits, group, bias=bias is not None)
        layer.qweight, layer.scales = quantize(weight, bits, group)
        if bias is not None:
            layer.bias = bias.detach().to(torch.float32).clone()
        return layer

    @property
    def format(self) -> str:
        return f"int{self.bits}"

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.bits, self.group)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 weight (a new tensor each time: for inspection, not for the hot path)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = _FAST if _FAST is not None else _fast()
        if fast and not x.requires_grad and x.dtype == torch.float32 and x.device.type == "cpu":
            return fast[0](x, self.qweight, self.scales, self.bias, self.bits, self.group, fast[1])
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def forward_lora(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float,
                     gate: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """`forward(x) + alpha * gate * (x a^T) b^T` for an unmerged LoRA (a [r, in], b [out, r]) on this layer, at
        inference, in one call into the kernel (`adapter_routing.install_inference_forward`); None where the kernel
        does not run (the caller adds the LoRA in torch). gate: [rows] (0 = the row stays this layer's result
        exactly) or None = every row."""
        fast = _FAST if _FAST is not None else _fast()
        if fast and x.dtype == torch.float32 and x.device.type == "cpu":
            return fast[2](x, self.qweight, self.scales, self.bias, self.bits, self.group, fast[1], a, b, alpha, gate)
        return None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format=int{self.bits}, "
                f"group={self.group}, bias={self.bias is not None}")


# ----- converting a model -------------------------------------------------------------------------------------------
def _linear_weight(module: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(weight [out, in], bias) of a plain fp linear layer (nn.Linear and its same-field subclasses such as
    dlm.cpu_kernel.SmallRowLinear, GPT-2's Conv1D), else None."""
    from .cpu_kernel import SmallRowLinear
    if type(module) in (nn.Linear, SmallRowLinear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):   # transformers.pytorch_utils.Conv1D: [in, out]
        return module.weight.t(), module.bias
    return None


def quantize_model(model: nn.Module, fmt: str, group: int = DEFAULT_GROUP, head_bits: Optional[int] = 8) -> int:
    """Replace every fp linear layer of `model` (on the CPU) by a PackedLinear of `fmt` ("int8" / "int4"); returns
    how many were replaced. The output head (`get_output_embeddings()`, tied to the input embedding or not) gets
    `head_bits` (8 by default: see the module docstring; None = the format's own); the input embedding stays.
    LoRA layers' own matrices (peft's lora_A / lora_B) stay fp32; their `base_layer` is packed. A layer whose
    input width is not a multiple of `group` stays as it is."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    bits = BITS[fmt]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = 0
    # peft's trainable-token rows on a Linear (the [MASK] row of a head tied to the embedding): the layer computes
    # F.linear with the base weight's rows replaced (a copy of the whole head per call); packed, it is one layer of
    # the weight with the active adapter's rows in it
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            tok = getattr(child, "token_adapter", None)
            if tok is None or _linear_weight(getattr(tok, "base_layer", None)) is None:
                continue
            w, b = _linear_weight(tok.base_layer)
            if w.device.type != "cpu" or w.shape[1] % group:
                continue
            with torch.no_grad():
                active = [a for a in tok.active_adapters if a in getattr(tok, "token_indices", {})]
                if active and not tok.disable_adapters and not tok.merged:
                    w = tok.get_merged_weights(active)
            layer_bits = head_bits if (child is head and head_bits is not None) else bits
            setattr(parent, child_name, PackedLinear.from_weight(w, b, layer_bits, group))
            n += 1
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replace = []
    for name, parent in model.named_modules():
        if any(part.startswith("lora_") for part in name.split(".")):
            continue
        for child_name, child in parent.named_children():
            if child_name.startswith("lora_"):
                continue
            wb = _linear_weight(child)
            if wb is None or wb[0].device.type != "cpu" or not wb[0].is_floating_point():
                continue
            if wb[0].shape[1] % group:
                continue
            replace.append((parent, child_name, child, wb))
    for parent, child_name, child, (w, b) in replace:
        layer_bits = head_bits if (child is head and head_bits is not None) else bits
        setattr(parent, child_name, PackedLinear.from_weight(w, b, layer_bits, group))
    return n + len(replace)


def int4_exact(model: nn.Module, rows: int = 16) -> bool:
    """Whether packing `model` as `quantize_model(model, "int4")` does gives back its weights exactly: every linear
    layer on the int4 grid and the output head on int8's, as in a model read from a Q4_1 GGUF with a Q8_0
    embedding (the blocks, scales and minima are the formats' own). Checked on `rows` rows of every layer (GGUF
    types are per tensor, so a layer of another type fails on any row); a model with no such layer is not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    checked = 0
    for module in model.modules():
        wb = _linear_weight(module)
        if wb is None or not wb[0].is_floating_point() or wb[0].shape[1] % DEFAULT_GROUP:
            continue
        bits = 8 if module is head else 4
        w = wb[0].detach()[:rows].to(torch.float32)
        if not torch.equal(dequantize(*quantize(w, bits), bits), w):
            return False
        checked += 1
    return checked > 0


def packed_modules(model: nn.Module) -> dict[str, int]:
    """{"PackedLinear(int4)": n, ...} for the packed layers of `model`."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            key = f"PackedLinear(int{m.bits})"
            counts[key] = counts.get(key, 0) + 1
    return counts


def model_format(model: nn.Module) -> Optional[str]:
    """"int8" / "int4" for a packed model (int4 when its linears are int4, whatever the head), else None."""
    counts = packed_modules(model)
    if not counts:
        return None
    return "int4" if counts.get("PackedLinear(int4)") else "int8"


def status() -> dict:
    """What this machine does with packed layers (builds the kernel): for `dlm kernel` / `dlm info`."""
    reason = _build() if os.environ.get("DLM_CPU_KERNEL", "").strip().lower() != "off" else "DLM_CPU_KERNEL=off"
    return {"packed_kernel_built": reason is None, "packed_kernel_path": kernel_path(), "packed_kernel_reason": reason}
