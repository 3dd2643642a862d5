"""What each decoder and reveal rule is, declared next to its function and readable without importing torch.

A decoder declares, in its decorator, the `SamplerConfig` settings it reads and what it can do:

    @decoder("full", description="the paper's sampler: full attention, any order, infilling",
             uses=("steps", "block_length", "remasking", "threshold", "use_cache"), fixed_positions=True)
    def decode_full(run: DecodeRun) -> Iterator[Step]: ...

    name:            the value of `SamplerConfig.decoder` that selects it.
    description:     one line for the CLI's help, the app's widgets and its config summary.
    uses:            the per-decoder settings it reads (the `SamplerConfig` fields marked `per_decoder`: steps,
                     block_length, remasking, threshold, stop_at_eos, use_cache). Every decoder reads the common
                     ones (max_new_tokens, temperature, top_p, top_k, suppress_eos, seed) through `DecodeRun`.
                     A changed setting outside `uses` is reported (`SamplerConfig.ignored_settings`).
    fixed_positions: it keeps any set of canvas positions fixed, not only a prompt: infilling, pinned words, edits.
    block_mode:      it works block by block and has no sensible default size: the config must give block_length.

A reveal rule declares `@reveal_rule("name", description=..., uses_threshold=...)` the same way (`dlm.reveal`).

Why read, not imported: choosing and validating a config (the CLI's flags, the app's widgets, `SamplerConfig()`)
needs the declarations but not the decoders, which import torch. So the built-in declarations are read from the
source of `dlm.decoders.*` and `dlm.reveal` (their decorator calls, which therefore take literal arguments only),
and a decoder's module is imported when it first runs (`spec.load()`). A decorator that runs registers its function
directly: a decoder defined anywhere else is registered when its file is imported. So a new decoder is one file:
a module in `dlm/decoders/` (found there), or any module of yours that you import.

This module imports nothing from `dlm` at import time: `dlm.sampler_config` reads it, everything else registers
into it.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional


@dataclass(frozen=True)
class Declared:
    """Where a declared function lives; `load()` gives it, importing its module the first time (built-in entries
    are read from source, so they have no `fn` until that module's decorator has run)."""

    module: str = field(default="", kw_only=True)
    function: str = field(default="", kw_only=True)
    fn: Optional[Callable] = field(default=None, kw_only=True, compare=False, repr=False)

    def load(self) -> Callable:
        return self.fn if self.fn is not None else getattr(importlib.import_module(self.module), self.function)


@dataclass(frozen=True)
class DecoderSpec(Declared):
    """One decoder's declaration (see the module docstring for each field)."""

    name: str
    description: str = ""
    uses: tuple[str, ...] = ()
    fixed_positions: bool = False
    block_mode: bool = False

    def __post_init__(self):
        object.__setattr__(self, "uses", tuple(self.uses))   # a list in a declaration is the same declaration


@dataclass(frozen=True)
class RevealRuleSpec(Declared):
    """One reveal rule's declaration. uses_threshold: False for a rule that ignores `threshold` (the config then
    refuses one instead of silently not using it)."""

    name: str
    description: str = ""
    uses_threshold: bool = True


class Registry(Mapping):
    """name -> spec. The built-in entries are the `@<decorator>(...)` declarations in the source of `source` (a
    module, or every module of a package), read on first use; decorators that run add or complete entries."""

    def __init__(self, kind: str, source: str, decorator: str, spec_type: type):
        self.kind, self.source, self.decorator, self.spec_type = kind, source, decorator, spec_type
        self._specs: dict[str, object] = {}
        self._read_builtins = False

    def _all(self) -> dict:
        if not self._read_builtins:   # (reading imports nothing, so this cannot re-enter itself)
            for module, function, args, kwargs in declarations(self.source, self.decorator):
                spec = self.spec_type(*args, module=module, function=function, **kwargs)
                self._specs.setdefault(spec.name, spec)   # a decorator that already ran registered the same one
            self._read_builtins = True
        return self._specs

    def add(self, spec) -> None:
        """Register `spec`; a name already declared by another function is an error (names select decoders)."""
        old = self._all().get(spec.name)
        if old is not None and (old.module, old.function) != (spec.module, spec.function):
            raise ValueError(f"{self.kind} {spec.name!r} is already declared by {old.module}.{old.function}")
        self._specs[spec.name] = spec

    def remove(self, name: str) -> None:
        """Forget a registered entry (tests register throwaway decoders)."""
        self._all().pop(name, None)

    def __getitem__(self, name: str):
        specs = self._all()
        if name not in specs:
            raise KeyError(f"unknown {self.kind} {name!r} (known: {', '.join(specs)})")
        return specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def declarations(source: str, decorator: str) -> Iterator[tuple[str, str, list, dict]]:
    """(module, function, positional args, keyword args) of every top-level function in `source` decorated with
    `@decorator(...)`, read from the files with `ast`: nothing is imported or run. Files starting with "_" are
    skipped. A non-literal argument is an error naming the file and line."""
    found = importlib.util.find_spec(source)
    if found is None:
        raise ImportError(f"no module named {source!r}")
    if found.submodule_search_locations:   # a package: each of its modules
        files = [(f"{source}.{p.stem}", p) for where in found.submodule_search_locations
                 for p in sorted(Path(where).glob("*.py")) if not p.name.startswith("_")]
    else:
        files = [(source, Path(found.origin))]
    for module, path in files:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            for call in node.decorator_list:
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == decorator:
                    try:
                        args = [ast.literal_eval(a) for a in call.args]
                        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
                    except ValueError:
                        raise ValueError(f"{path}:{call.lineno}: @{decorator}(...) takes literal arguments only "
                                         "(its declaration is read without importing the module)") from None
                    yield module, node.name, args, kwargs


DECODERS = Registry("decoder", "dlm.decoders", "decoder", DecoderSpec)
REVEAL_RULES = Registry("reveal rule", "dlm.reveal", "reveal_rule", RevealRuleSpec)


def decoder(name: str, *, description: str = "", uses: tuple[str, ...] = (), fixed_positions: bool = False,
            block_mode: bool = False) -> Callable[[Callable], Callable]:
    """Register a decoder `fn(run: DecodeRun) -> Iterator[Step]` under `name` (a value of `SamplerConfig.decoder`)
    with its declaration (see the module docstring). In `dlm/decoders/` the arguments must be literals."""
    def register(fn: Callable) -> Callable:
        DECODERS.add(DecoderSpec(name, description, uses, fixed_positions, block_mode, module=fn.__module__,
                                 function=fn.__qualname__, fn=fn))
        return fn
    return register


def reveal_rule(name: str, *, description: str = "", uses_threshold: bool = True) -> Callable[[Callable], Callable]:
    """Register a reveal rule `fn(Proposal) -> [B, n] bool` under `name` (a value of `SamplerConfig.remasking`).
    uses_threshold=False for a rule that ignores `threshold`. In `dlm/reveal.py` the arguments must be literals."""
    def register(fn: Callable) -> Callable:
        REVEAL_RULES.add(RevealRuleSpec(name, description, uses_threshold, module=fn.__module__,
                                        function=fn.__qualname__, fn=fn))
        return fn
    return register
