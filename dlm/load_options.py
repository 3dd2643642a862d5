"""The choices `dlm.load` accepts, in a torch-free module so that argument parsers (the CLI, the app's launcher,
the benchmarks) and widgets list them without importing torch."""

QUANTIZATIONS = ("none", "8bit", "4bit")                                 # bitsandbytes: LLM.int8 / NF4
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")    # flash_attention_2 falls back to sdpa
