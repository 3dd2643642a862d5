"""The choices `dlm.load` accepts, in a torch-free module so that argument parsers (the CLI, the app's launcher,
the benchmarks) and widgets list them without importing torch."""

QUANTIZATIONS = ("none", "8bit", "4bit", "int8", "int4")   # bitsandbytes LLM.int8 / NF4; dlm's packed CPU formats
PACKED_QUANTIZATIONS = ("int8", "int4")   # dlm.packed_linear: weight-only, fp32 activations, CPU (GGUF Q8_0 / Q4_1)
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")    # flash_attention_2 falls back to sdpa
