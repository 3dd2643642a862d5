"""The tab registry (`app.tabs.TABS`): the one list the playground is built from, each entry a loadable tab whose
own `gr.Tab(...)` carries the registry's id and title (read from its source with `ast`)."""
from __future__ import annotations

import ast
import inspect

import pytest

from app.tabs import TABS, listing, titles
from dlm.sampler_config import Task


def test_registry_shape():
    assert len({t.id for t in TABS}) == len(TABS) and len({t.title for t in TABS}) == len(TABS)
    assert [t.config for t in TABS].count(None) == 1 and TABS[-1].config is None   # the model tab, built last
    assert {t.config for t in TABS[:-1]} <= set(Task)
    assert listing(["A"]) == "A" and listing(["A", "B"]) == "A and B" and listing(["A", "B", "C"]) == "A, B and C"
    assert titles("infill") == ["Infill"]


@pytest.mark.parametrize("spec", TABS, ids=lambda t: t.id)
def test_each_tab_loads_and_declares_its_registry_id_and_title(spec):
    cls = spec.load()
    params = list(inspect.signature(cls).parameters)
    assert params[0] == "backend" and (len(params) == 3 if spec.config is None else params[1:] in ([], ["examples"]))
    tabs = [node for node in ast.walk(ast.parse(inspect.getsource(inspect.getmodule(cls))))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "Tab"]
    assert len(tabs) == 1
    (call,) = tabs
    ids = [k.value.value for k in call.keywords if k.arg == "id"]
    assert ids == [spec.id]
    if isinstance(call.args[0], ast.Constant):   # a literal title (else read from the registry)
        assert call.args[0].value == spec.title
