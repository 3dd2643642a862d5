"""The choices `dlm.load` accepts, and the error it raises, in a torch-free module so that argument parsers (the CLI,
the app's launcher, the benchmarks) and widgets list them without importing torch."""

QUANTIZATIONS = ("auto", "none", "8bit", "4bit", "int8", "int4")   # auto: int4 where it is exact (see dlm.load);
# bitsandbytes LLM.int8 / NF4; dlm's packed CPU formats
PACKED_QUANTIZATIONS = ("int8", "int4")   # dlm.packed_linear: CPU, GGUF Q8_0 / Q4_1 weights, int8 rows in the kernel
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")    # flash_attention_2 falls back to sdpa


class LoadError(ValueError):
    """A model could not be loaded; the message says what was wrong and what to do."""
