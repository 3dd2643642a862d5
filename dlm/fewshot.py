"""Curated few-shot examples shipped as package data in `dlm/examples/*.txt` (and the Infill templates in
`dlm/examples/infill/`), and the one function that runs and scores one: the playground's In-context scoreboard
and `dlm-eval --tasks incontext` both call `run_example`.

Each file is a small header of `key: value` lines, a line `---`, then the prompt exactly as the model sees it:

    title: Word analogies          (shown in the UI; defaults to the file name)
    category: analogy              (free text)
    max_new_tokens: 8              (suggested length of the answer)
    steps: 8                       (suggested denoising steps; defaults to max_new_tokens)
    expected: cat                  (optional: the right answer; the In-context scoreboard marks outputs)
    hard: why                      (optional: the shipped model usually misses it, measured; shown as such,
                                    and the In-context tab opens on an example without it)
    ---
    hot is to cold as up is to down
    ...

Plain text rather than JSON so the prompts (with their newlines) stay readable and easy to edit.
"""
from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

EXAMPLES_DIR = Path(str(importlib.resources.files("dlm") / "examples"))
INFILL_EXAMPLES_DIR = EXAMPLES_DIR / "infill"   # the playground's Infill templates (`expected`: the spans, "|"-split)


@dataclass
class Example:
    name: str  # file stem, stable id
    title: str
    category: str
    prompt: str
    max_new_tokens: int = 32
    steps: int = 32
    expected: str = ""
    hard: str = ""  # why the shipped model usually misses it (measured), "" = it does it well

    @property
    def label(self) -> str:
        """The title as the examples list shows it: marked when it is hard for the shipped model."""
        return f"{self.title} (hard for the shipped model)" if self.hard else self.title

    def config(self, base):
        """This example's generation config over `base` (the model's writing config): its answer length, and its
        steps where the decoder reads steps."""
        from .sampler_config import read_by
        return base.replace(**read_by(base.decoder, dict(max_new_tokens=self.max_new_tokens,
                                                         steps=min(self.steps, self.max_new_tokens))))


def run_example(model, example: Example, base, side: str = "dlm", ar_model=None, seed=None) -> tuple[str, bool]:
    """One example through one side -> (output text, right?). side "dlm": `model.generate`; "ar": the AR model
    (`ar_model`, else `model`'s weights run causally). The In-context scoreboard and `dlm-eval --tasks incontext`
    both score with this function, so the app's marks and the evaluation's accuracy come from one code path."""
    cfg = example.config(base)
    if seed is not None:
        cfg = cfg.replace(seed=seed)
    if side == "dlm":
        text = model.generate(example.prompt, cfg).text
    elif side == "ar":
        text = model.ar_generate(example.prompt, cfg, ar_model=ar_model).text
    else:
        raise ValueError(f"side must be dlm or ar, got {side!r}")
    return text, matches(example.expected, text)


def parse_example(text: str, name: str) -> Example:
    """Parse one example file's text; raises ValueError naming the file when the header is malformed."""
    head, sep, body = text.partition("\n---\n")
    if not sep:
        raise ValueError(f"example {name!r}: missing the '---' line between header and prompt")
    meta: dict[str, str] = {}
    for lineno, line in enumerate(head.splitlines(), 1):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"example {name!r}, header line {lineno}: expected 'key: value', got {line!r}")
        meta[key.strip().lower()] = value.strip()
    prompt = body.rstrip("\n")
    if not prompt.strip():
        raise ValueError(f"example {name!r}: the prompt is empty")
    try:
        max_new = int(meta.get("max_new_tokens", 32))
        steps = int(meta.get("steps", max_new))
    except ValueError as e:
        raise ValueError(f"example {name!r}: max_new_tokens / steps must be integers ({e})") from None
    return Example(
        name=name,
        title=meta.get("title", name),
        category=meta.get("category", ""),
        prompt=prompt,
        max_new_tokens=max_new,
        steps=steps,
        expected=meta.get("expected", ""),
        hard=meta.get("hard", ""),
    )


def load_examples(directory: Path | str = EXAMPLES_DIR) -> list[Example]:
    """All `*.txt` examples in `directory`, sorted by file name (empty list when the folder is missing)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return [parse_example(p.read_text(encoding="utf-8"), p.stem) for p in sorted(directory.glob("*.txt"))]


def answer_of(output: str) -> str:
    """The answer part of a few-shot continuation: its first non-empty line (the model goes on with the next
    example after it)."""
    return next((line.strip() for line in output.splitlines() if line.strip()), "")


def matches(expected: str, output: str) -> bool:
    """The scoreboard's mark: the expected answer appears as a whole word (case-insensitive) in the first line of
    the output. Lenient on purpose (a worked answer such as "6 * 3 = 18 pages" counts), and the same for every
    model, so the accuracy of the DLM and the AR model are comparable."""
    if not expected.strip():
        return False
    return re.search(rf"(?<!\w){re.escape(expected.strip())}(?!\w)", answer_of(output), re.IGNORECASE) is not None
