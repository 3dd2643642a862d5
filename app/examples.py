"""Compatibility name: the few-shot examples moved into the library, `dlm.fewshot` (evaluation uses them too).
Import from there; this module goes once nothing imports it."""
from dlm.fewshot import (  # noqa: F401
    EXAMPLES_DIR,
    INFILL_EXAMPLES_DIR,
    Example,
    answer_of,
    load_examples,
    matches,
    parse_example,
    run_example,
)
