"""The playground's tabs, one file each, listed once here in the order they show (`app.ui` builds them from this
list; the Model tab's summary names the tabs from it). Plain data, no Gradio: a tab's module is imported when the
playground is built.

A tab that runs the model is built as `Class(backend)` and has `controls` (its `SamplerControls`) and a `stop`
button; `config` names the model's recommended config its sampler widgets start from (`Backend.base_config`).
The tab with `config=None` manages the model: it is built last, as `Class(backend, <the others' controls>, banner)`,
so that loading a model resets every other tab's widgets.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

from dlm.sampler_config import Task


@dataclass(frozen=True)
class TabSpec:
    id: str                 # Gradio's tab id
    title: str              # the tab's label
    cls: str                # "module:Class" under app.tabs
    config: Optional[Task]  # the recommended config it starts from (`dlm.Task`); None: the model tab

    def load(self) -> type:
        module, name = self.cls.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)


TABS = (
    TabSpec("denoise", "Denoise", "denoise:DenoiseTab", Task.DENOISE),
    TabSpec("infill", "Infill", "infill:InfillTab", Task.INFILL),
    TabSpec("icl", "In-context", "incontext:InContextTab", Task.WRITE),
    TabSpec("compare", "AR vs DLM", "race:RaceTab", Task.WRITE),
    TabSpec("model", "Model", "model:ModelTab", None),
)
TAB = {t.id: t for t in TABS}


def titles(config: Task) -> list[str]:
    """The titles of the tabs that start from `config`, in order."""
    return [t.title for t in TABS if t.config == config]


def listing(names: list[str]) -> str:
    """"A", "A and B", "A, B and C"."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
