"""dlm's packed weight-only CPU formats (`quantization="int8" | "int4"`, dlm.packed_linear): the kernel against the
dequantized weights within the fp32 arithmetic's error bound on every SIMD path this CPU has (portable C++, AVX2,
AVX-512), the formats' round trip (exact on GGUF Q8_0 / Q4_1 grids), loading tiny models of two families, a LoRA on
top of a packed base, the fallback without the kernel, and the real default (slow): int4 gives back its GGUF."""
import pytest
import torch
import torch.nn.functional as F

import dlm
from dlm import packed_linear as pl
from dlm.cpu_kernel import cpu_flags
from dlm.loading import LoadError, quantization_config

pytestmark = pytest.mark.numeric   # make test-kernels runs it again under ATEN_CPU_CAPABILITY=default / avx2

U = 2.0 ** -24   # fp32 unit roundoff
# ||logits_q - logits|| / ||logits|| against fp32 on the tiny random models (Gaussian weights, 64 wide: no GGUF grid,
# the worst case for 16 levels a block): measured ~0.01 (int8) and 0.2-0.35 (int4); the real model's table is in
# docs/method.md
REL_ERROR = {"int8": 0.05, "int4": 0.5}
# packed model against the fp32 model on the same weights and quantized rows (`_dequantized_reference`): the fp32
# sums' order differs, and where an activation's x / d lands within that rounding of a half, the two round it to
# neighbouring integers, one step (max|x| / 127 of its block) apart, which the next layers carry
SAME_ROWS = 1e-3
# an unmerged LoRA at inference on a packed LLaMA / Qwen2 layer (dlm.lean_layers): its A and B run as packed int8 on
# int8 rows; measured 1-3e-2 (by kernel path) on the tiny models' random adapters (init_lora_weights=False: an update
# as large as the layer's own output, the worst case for rounding it)
LORA_INT8 = 5e-2


def _paths():
    flags, out = cpu_flags(), ["default"]
    if {"avx2", "fma", "f16c"} <= flags:
        out.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        out.append("avx512")
    return out


@pytest.fixture(scope="module")
def kernel():
    if not pl.available():
        pytest.skip(f"packed kernel unavailable: {pl._build()}")


def _magnitudes(q, s, bits, group=32):
    """|d q| + |m| per weight (the two terms of a dequantized int4 weight, whose sum may cancel), |d q| for int8."""
    q, s = pl.untile(q, s)
    n = q.shape[0]
    if bits == 8:
        return (q.float().abs().reshape(n, -1, group) * s.float().abs()[..., None]).reshape(n, -1)
    b = q.reshape(n, -1, 16)
    qq = torch.cat([b & 15, b >> 4], -1).float().reshape(n, -1, group)
    return (qq * s[..., 0, None].float().abs() + s[..., 1, None].float().abs()).reshape(n, -1)


def _x_hat(x):
    q, d = pl.quantize_activations(x)
    return (q.double().reshape(*d.shape, 32) * d.double()[..., None]).reshape(x.shape)


def _bound(x, q, s, bits, group, b):
    """|y - reference| <= (2 K / 32 + 3) u sum_k |x^_k| (|d q_k| + |m|) + u |b|: one rounding per block term
    (fl(d_w d_x), fl(d_x sum q)), a chain of 2 K / 32 FMAs, and the bias's addition."""
    k = x.shape[-1]
    mag = _x_hat(x).abs() @ _magnitudes(q, s, bits, group).double().T
    return (2 * k // 32 + 3) * U * mag + U * (0 if b is None else b.abs().double())


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,k,group", [(577, 64, 32), (96, 576, 32), (40, 256, 64), (7, 128, 128)])
def test_kernel_matches_the_reference(kernel, path, bits, n, k, group):
    """The kernel computes x^ @ dequant(W)^T + b (x^: the rows quantized per block of 32, `reference_matmul`) within
    the fp32 arithmetic's bound, for full 16-row tiles and a narrower last one (577, 7 rows)."""
    g = torch.Generator().manual_seed(n + k + bits)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g)
    q, s = pl.quantize(w, bits, group)
    for rows in (1, 2, 3, 4, 5, 8, 9, 17, 40):
        x = torch.randn(rows, k, generator=g)
        for bias in (None, b):
            y = pl.packed_matmul(x, q, s, bias, bits, group, path=path)
            err = (y.double() - pl.reference_matmul(x, q, s, bias, bits, group)).abs()
            assert (err <= _bound(x, q, s, bits, group, bias)).all(), (rows, err.max().item())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_activations_stay_within_half_a_step_of_fp32(kernel, bits):
    """Against fp32 activations (x @ dequant(W)^T), quantizing each block of x moves every x_k by at most half its
    block's step d / 2 (d = max|x| / 127): |y - y_fp32| <= sum_k |w_k| d_b / 2 (+ rounding)."""
    g = torch.Generator().manual_seed(bits)
    w, x = torch.randn(160, 256, generator=g) * 0.05, torch.randn(6, 256, generator=g) * 3
    x[:, 7] = 40.0   # an outlier coarsens its block's grid, not the others'
    q, s = pl.quantize(w, bits)
    y = pl.packed_matmul(x, q, s, None, bits).double()
    w_hat = pl.dequantize(q, s, bits).double()
    exact = x.double() @ w_hat.T
    _, d = pl.quantize_activations(x)
    half_step = (d.double() / 2).repeat_interleave(32, dim=-1)
    bound = half_step @ w_hat.abs().T + _bound(x, q, s, bits, 32, None) + 1e-9
    assert ((y - exact).abs() <= bound).all()
    assert ((y - exact).abs() > 0).any()   # it is not fp32's product


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("bits", [8, 4])
def test_a_row_does_not_depend_on_its_batch_mates(kernel, path, bits):
    w = torch.randn(200, 96) * 0.1
    q, s = pl.quantize(w, bits)
    x = torch.randn(11, 96)
    together = pl.packed_matmul(x, q, s, None, bits, path=path)
    for i in range(11):
        assert torch.equal(pl.packed_matmul(x[i:i + 1], q, s, None, bits, path=path)[0], together[i])


def test_other_threads_get_the_same_bits_on_the_kernels_own_pool(kernel):
    """Off the main thread the kernel's loops run on its own thread pool instead of OpenMP (csrc: parallel_rows):
    the same results bit for bit, from several threads at once and after torch's thread count changes."""
    import threading
    w = torch.randn(1000, 192) * 0.1
    q, s = pl.quantize(w, 4)
    x = torch.randn(5, 192)
    k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    qa = torch.randn(1, 6, 3, 32)
    want = (pl.packed_matmul(x, q, s, None, 4), pl.row_attention(qa, k, v, None, 32 ** -0.5))
    got, errors = [], []

    def work():
        try:
            for _ in range(20):
                got.append((pl.packed_matmul(x, q, s, None, 4), pl.row_attention(qa, k, v, None, 32 ** -0.5)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads_before = torch.get_num_threads()
    try:
        for count in (threads_before, max(2, threads_before)):
            torch.set_num_threads(count)
            workers = [threading.Thread(target=work) for _ in range(3)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
    finally:
        torch.set_num_threads(threads_before)
    assert not errors and len(got) == 120
    for y, a in got:
        assert torch.equal(y, want[0]) and torch.equal(a, want[1])


def test_paths_agree_bit_for_bit(kernel):
    """Every path does the same fp32 operations in the same order on exact integer block sums (the SIMD paths in
    lanes, the portable one with std::fma): the same bits on any CPU, full tiles and the narrower last one."""
    w, x = torch.randn(70, 320) * 0.1, torch.randn(5, 320)
    for bits in (8, 4):
        q, s = pl.quantize(w, bits)
        ys = [pl.packed_matmul(x, q, s, None, bits, path=p) for p in _paths()]
        assert all(torch.equal(y, ys[0]) for y in ys)


def test_tiles_are_a_permutation_of_the_row_major_blocks():
    """quantize's tile-major buffers hold the row-major (GGUF) blocks permuted within tiles of 16 rows: untile gives
    them back, and whole tiles slice and concatenate along the rows like rows do (the lean layers' fused q|k|v)."""
    w = torch.randn(48 + 5, 64)
    for bits in (8, 4):
        q, s = pl.quantize(w, bits)
        rq, rs = pl.untile(q, s)
        assert not torch.equal(rq, q) and torch.equal(pl.tile(rq, rs)[0], q)
        top = pl.quantize(w[:32], bits)
        assert torch.equal(q[:32], top[0]) and torch.equal(s[:32], top[1])
        assert torch.equal(pl.dequantize(q[16:48], s[16:48], bits), pl.dequantize(q, s, bits)[16:48])


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_is_within_half_a_step(bits):
    w = torch.randn(33, 160) * 0.03
    q, s = pl.quantize(w, bits)
    deq = pl.dequantize(q, s, bits)
    rs = pl.untile(q, s)[1]   # row-major scales
    step = (rs[..., 0] if bits == 4 else rs).float().repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-3) + 1e-7).all()
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8) and q.shape == (33, 160 if bits == 8 else 80)


def test_gguf_grids_come_back_exactly():
    """Weights on a Q4_1 grid (q * d + m, fp16 d and m, q 0..15 with both ends used, as llama.cpp quantizes) and on
    a Q8_0 grid (q * d, |q| up to 127) pack into the same blocks: dequantizing gives them back bit for bit."""
    g = torch.Generator().manual_seed(0)
    n, k = 48, 192
    d = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(n, k // 32, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g)
    q[..., 0], q[..., 5] = 0, 15
    w4 = (q * d[..., None] + m[..., None]).reshape(n, k)
    assert torch.equal(pl.dequantize(*pl.quantize(w4, 4), 4), w4)
    q8 = torch.randint(-127, 128, (n, k // 32, 32), generator=g)
    q8[..., 3] = 127
    w8 = (q8 * d[..., None]).reshape(n, k)
    assert torch.equal(pl.dequantize(*pl.quantize(w8, 8), 8), w8)


def test_module_forward_fallback_and_gradients(kernel, monkeypatch):
    lin = torch.nn.Linear(128, 70)
    p = pl.PackedLinear.from_weight(lin.weight, lin.bias, 4)
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        fast = p(x)
        monkeypatch.setattr(pl, "_FAST", ())   # as where the kernel cannot be built
        slow = p(x)
    exact = F.linear(x.double(), p.dequantize().double(), p.bias.double())
    ref = pl.reference_matmul(x, p.qweight, p.scales, p.bias, 4)
    assert fast.shape == (2, 5, 70) and (fast.double() - ref).abs().max() < 1e-4
    assert (slow.double() - exact).abs().max() < 1e-4   # without the kernel: fp32 activations
    xg = x.clone().requires_grad_(True)
    p(xg).sum().backward()   # a LoRA trained on a packed base needs the input's gradient
    assert torch.allclose(xg.grad, p.dequantize().sum(0).expand(2, 5, 128), atol=1e-5)


def _ids(n=12):
    return torch.arange(20, 20 + n)[None]


def _logits(model, ids=None):
    with torch.no_grad():
        return model.denoise_logits(_ids() if ids is None else ids).double()


def _quantize_input(module, args):
    x = args[0]
    q, d = pl.quantize_activations(x)
    return ((q.float().reshape(*d.shape, 32) * d[..., None]).reshape(x.shape),) + tuple(args[1:])


def _dequantized_reference(model, bits, head_bits=8):
    """The fp32 model with each linear's weight replaced by what its packed form stands for and its input by the
    kernel's quantized rows (x^ = q * d): what the packed model computes, up to the order of the fp32 sums."""
    from transformers.pytorch_utils import Conv1D
    base = model.base.get_base_model() if hasattr(model.base, "get_base_model") else model.base
    head = base.get_output_embeddings()
    with torch.no_grad():
        for name, mod in list(base.named_modules()):
            if "lora_" in name:
                continue
            if isinstance(mod, torch.nn.Linear) or isinstance(mod, Conv1D):
                w = mod.weight.t() if isinstance(mod, Conv1D) else mod.weight
                b = head_bits if mod is head else bits
                deq = pl.dequantize(*pl.quantize(w, b), b)
                if mod is head:   # tied to the input embedding: the lookup keeps fp32 weights
                    mod.weight = torch.nn.Parameter(deq)
                else:
                    mod.weight.copy_(deq.t() if isinstance(mod, Conv1D) else deq)
                mod.register_forward_pre_hook(_quantize_input)
    return model


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_load_packs_every_linear(kernel, family, fmt, family_dir):
    directory = family_dir(family)
    fp32 = dlm.load(directory, device="cpu", quantization=None)
    packed = dlm.load(directory, device="cpu", quantization=fmt)
    assert packed.quantization == fmt and fp32.quantization == "none"
    counts = pl.packed_modules(packed.base)
    n_layers = fp32.base.config.num_hidden_layers
    per_layer = 7 if family == "llama" else 4   # q k v o gate up down / GPT-2's c_attn c_proj c_fc c_proj
    bits = pl.BITS[fmt]
    assert counts.get(f"PackedLinear(int{bits})", 0) + counts.get("PackedLinear(int8)", 0) * (bits == 4) \
        == n_layers * per_layer + 1
    assert isinstance(packed.base.get_output_embeddings(), pl.PackedLinear)
    assert isinstance(packed.base.get_input_embeddings(), torch.nn.Embedding)
    out = _logits(packed)
    ref = _logits(_dequantized_reference(dlm.load(directory, device="cpu"), bits))
    assert ((out - ref).norm() / ref.norm()).item() < SAME_ROWS
    full = _logits(fp32)
    assert ((out - full).norm() / full.norm()).item() < REL_ERROR[fmt]
    g = packed.generate("the", max_new_tokens=6, decoder="full", steps=3, seed=0)
    assert len(g.token_ids) > 0 and packed.mask_token_id not in g.token_ids


def _adapter(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    m = dlm.load(tiny_llama_dir, device="cpu")
    m.base = get_peft_model(m.base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                               target_modules=["q_proj", "v_proj", "down_proj"]))
    m.save_pretrained(tmp_path / "adapter", base_model=str(tiny_llama_dir))
    return tmp_path / "adapter"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_lora_on_top_of_a_packed_base(kernel, fmt, tiny_llama_dir, tmp_path):
    """The LoRA stays fp32 and unmerged on top, its base_layer is packed (merging first would move the weights off
    the base's grid); the lean inference forward computes what peft's does."""
    adapter = _adapter(tiny_llama_dir, tmp_path)
    unmerged = dlm.load(adapter, device="cpu", quantization=fmt)
    assert hasattr(unmerged.base, "peft_config")
    lora = [mod for name, mod in unmerged.base.named_modules() if name.endswith("q_proj")][0]
    assert isinstance(lora.base_layer, pl.PackedLinear)
    assert isinstance(lora.lora_A["default"], torch.nn.Linear)   # the LoRA's own matrices stay fp32 (the small-row
    assert lora.lora_A["default"].weight.dtype == torch.float32   # kernel's nn.Linear under AVX2)
    ref = _logits(_dequantized_reference(dlm.load(adapter, device="cpu", merge_adapter=False), pl.BITS[fmt]))
    out = _logits(unmerged)
    assert ((out - ref).norm() / ref.norm()).item() < LORA_INT8
    assert unmerged.quantization == fmt
    with torch.enable_grad():   # grad mode takes peft's own forward (fp32 A and B, fp32 activations)
        ids = _ids()
        peft_out = unmerged.denoise_logits(ids).detach().double()
    assert ((out - peft_out).norm() / peft_out.norm()).item() < LORA_INT8
    full = _logits(dlm.load(adapter, device="cpu"))
    assert ((out - full).norm() / full.norm()).item() < REL_ERROR[fmt]


def _on_int4_grid(directory, tmp_path):
    """A copy of a tiny model whose linear weights lie on the int4 grid and its head on int8's (as a Q4_1 GGUF's
    with a Q8_0 embedding do)."""
    m = dlm.load(directory, device="cpu", quantization=None)
    head = m.base.get_output_embeddings()
    with torch.no_grad():
        for mod in m.base.modules():
            if isinstance(mod, torch.nn.Linear):
                bits = 8 if mod is head else 4
                mod.weight.copy_(pl.dequantize(*pl.quantize(mod.weight, bits), bits))
    m.save_pretrained(tmp_path / "grid")
    return tmp_path / "grid"


def test_auto_packs_int4_only_where_it_is_exact(kernel, tiny_llama_dir, tmp_path):
    """quantization="auto" (the default): int4 when packing gives back the weights exactly (a Q4_1 GGUF base),
    full precision for any other model, on a GPU or in another dtype; None keeps full precision."""
    assert dlm.load(tiny_llama_dir, device="cpu").quantization == "none"
    grid = _on_int4_grid(tiny_llama_dir, tmp_path)
    auto = dlm.load(grid, device="cpu")
    assert auto.quantization == "int4"
    assert dlm.load(grid, device="cpu", quantization=None).quantization == "none"
    assert dlm.load(grid, device="cpu", dtype="bf16").quantization == "none"
    ref = _logits(_dequantized_reference(dlm.load(grid, device="cpu", quantization=None), 4))
    out = _logits(auto)
    assert ((out - ref).norm() / ref.norm()).item() < SAME_ROWS


def test_saving_a_packed_model_says_how_instead_of_writing_what_loads_as_random(kernel, tiny_llama_dir, tmp_path):
    packed = dlm.load(tiny_llama_dir, device="cpu", quantization="int4")
    with pytest.raises(ValueError, match="quantization=None"):
        packed.save_pretrained(tmp_path / "packed")
    assert not (tmp_path / "packed").exists()
    dlm.load(tiny_llama_dir, device="cpu", quantization=None).save_pretrained(tmp_path / "fp32")   # the way out
    assert (tmp_path / "fp32" / "model.safetensors").is_file()


def test_bad_combinations_name_themselves():
    with pytest.raises(LoadError, match="packed CPU format"):
        quantization_config("int4", torch.float32, torch.device("cuda"))
    with pytest.raises(LoadError, match="fp32 activations"):
        quantization_config("int8", torch.bfloat16, torch.device("cpu"))
    assert quantization_config("int4", torch.float32, torch.device("cpu")) is None


def test_cli_accepts_the_packed_names(kernel, tiny_llama_dir, capsys):
    import json

    from dlm.cli import main
    assert main(["info", "--model", str(tiny_llama_dir), "--device", "cpu", "--quantization", "int4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quantization"] == "int4"


@pytest.mark.slow
def test_default_model_int4_is_its_gguf(kernel):
    """SmolLM2-135M ships as a Q4_1 GGUF (Q8_0 embedding): packed as int4 (head int8) its weights come back bit for
    bit; what moves its logits is the kernel's int8 rows (as llama.cpp's Q8 activations do), so against fp32 both
    formats stay close and pick the same next tokens (docs/method.md has the measured table)."""
    try:
        fp32 = dlm.load("smollm2-135m", device="cpu", quantization=None)
    except LoadError as e:
        pytest.skip(str(e))
    assert pl.int4_exact(fp32.base)
    ids = fp32.tokenizer("The old fisherman walked down to the sea every morning before sunrise, and",
                         return_tensors="pt").input_ids
    ref = _logits(fp32, ids)
    for fmt in ("int4", "int8"):
        out = _logits(dlm.load("smollm2-135m", device="cpu", quantization=fmt), ids)
        assert ((out - ref).norm() / ref.norm()).item() < 0.08, fmt
        assert (out[0].argmax(-1) == ref[0].argmax(-1)).float().mean().item() >= 0.85, fmt


def test_trainable_token_rows_of_a_tied_head(kernel, tiny_gpt2_dir, tmp_path):
    """An unmerged adapter with trainable token rows (the shipped DLM's [MASK] row) on GPT-2's tied head: peft wraps
    the head, whose packed form holds the adapter's row (it computed F.linear on a copy of the head with that row)."""
    from peft import LoraConfig, get_peft_model
    m = dlm.load(tiny_gpt2_dir, device="cpu")
    m.base = get_peft_model(m.base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["c_attn"],
                                               trainable_token_indices=[m.mask_token_id]))
    with torch.no_grad():
        for name, p in m.base.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))   # make the row differ from the base's
    m.save_pretrained(tmp_path / "adapter", base_model=str(tiny_gpt2_dir))
    ref_model = dlm.load(tmp_path / "adapter", device="cpu", merge_adapter=False)
    packed = dlm.load(tmp_path / "adapter", device="cpu", merge_adapter=False, quantization="int8")
    assert isinstance(packed.base.get_output_embeddings(), pl.PackedLinear)
    ref, out = _logits(ref_model), _logits(packed)
    col = packed.mask_token_id
    assert ((out - ref).norm() / ref.norm()).item() < REL_ERROR["int8"]
    assert ((out[..., col] - ref[..., col]).norm() / ref[..., col].norm()).item() < REL_ERROR["int8"]


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_on_a_packed_layer_in_one_call(kernel, bits):
    """forward_lora (the kernel's one-call LoRA: packed(x) + alpha * gate * (x a^T) b^T) equals the same sum in
    torch; a row whose gate is 0 is the packed layer's own result bit for bit (the verifier's rows). Without the
    kernel it returns None and the caller adds the LoRA itself."""
    torch.manual_seed(0)
    layer = pl.PackedLinear.from_weight(torch.randn(96, 64) * 0.05, torch.randn(96) * 0.1, bits)
    a, b = torch.randn(8, 64) * 0.1, torch.randn(96, 8) * 0.1
    x = torch.randn(2, 3, 64)
    gate = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    with torch.no_grad():
        out = layer.forward_lora(x, a, b, 2.0, gate)
        plain = layer(x)
        ref = plain + 2.0 * (gate.reshape(2, 3, 1) * (x @ a.t())) @ b.t()
        every = layer.forward_lora(x, a, b, 2.0, None)
    assert out.shape == (2, 3, 96)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.reshape(6, 96)[gate == 0], plain.reshape(6, 96)[gate == 0])
    assert torch.allclose(every, plain + 2.0 * (x @ a.t()) @ b.t(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert layer.forward_lora(x.double(), a.double(), b.double(), 2.0, None) is None


def test_row_attention_rows_do_not_depend_on_the_call(kernel):
    """The inference attention on a CPU (`row_attention`, what `attention.packed_gqa_sdpa` runs): SDPA's result
    within fp32 rounding, and each row the same bits alone, beside other rows, or beside keys its mask hides (a
    verify forward's clean rows beside a noisy block against an AR step: exact speculative decoding needs both)."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D, Q, K = 2, 6, 2, 32, 5, 40
    q, k, v = (torch.randn(B, h, t, D, generator=g) for h, t in ((H, Q), (Hkv, K), (Hkv, K)))
    mask = torch.rand(B, 1, Q, K, generator=g) > 0.4
    mask[..., 0] = True
    out = pl.row_attention(q, k, v, mask, D ** -0.5)
    rep = H // Hkv
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         attn_mask=mask).transpose(1, 2)
    assert (out - ref).abs().max().item() < 1e-5
    hidden = torch.zeros(B, 1, Q, 9, dtype=torch.bool)
    wider = pl.row_attention(q, torch.cat([k, torch.randn(B, Hkv, 9, D, generator=g)], 2),
                             torch.cat([v, torch.randn(B, Hkv, 9, D, generator=g)], 2), torch.cat([mask, hidden], -1),
                             D ** -0.5)
    assert torch.equal(wider, out)
    for i in range(Q):
        assert torch.equal(pl.row_attention(q[:, :, i:i + 1], k, v, mask[:, :, i:i + 1], D ** -0.5)[:, 0], out[:, i])
    causal = pl.row_attention(q, k[:, :, :Q], v[:, :, :Q], None, D ** -0.5)
    ref = F.scaled_dot_product_attention(q, k[:, :, :Q].repeat_interleave(rep, 1), v[:, :, :Q].repeat_interleave(
        rep, 1), is_causal=True).transpose(1, 2)
    assert (causal - ref).abs().max().item() < 1e-5


def test_a_cached_step_is_the_full_forwards_row_bit_for_bit(kernel, tiny_llama_dir):
    """A packed model's last position: one forward over the whole sequence, a prefill and a 1-row step, a prefill
    and a 3-row step: the same logits to the bit (the kernel's rows and the attention's rows are independent)."""
    from transformers import DynamicCache
    m = dlm.load(tiny_llama_dir, device="cpu", quantization="int4")
    ids = torch.arange(5, 45)[None]
    with torch.inference_mode():
        full = m.base(input_ids=ids).logits[0, -1]
        for split in (1, 3):
            cache = DynamicCache(config=m.base.config)
            m.base(input_ids=ids[:, :-split], cache=cache, use_cache=True)
            step = m.base(input_ids=ids[:, -split:], cache=cache, use_cache=True).logits[0, -1]
            assert torch.equal(step, full), split
