"""The registry: a method is one file; everything else reads it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import himap_vlm
from conftest import PROMPTS, image_for, make_inputs, tiny
from himap_vlm.core.methods import registry
from himap_vlm.core.methods.spec import MethodSpec, MethodSpecError, parse_methods

ROOT = Path(__file__).resolve().parents[1]


def test_the_documented_example_is_a_working_method(scratch_registry):
    text = (ROOT / "docs" / "methods.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/methods.md", "exec"), namespace)
    cls = namespace["LastToken"]
    assert himap_vlm.get_method("last-token") is cls and himap_vlm.LastToken is cls
    assert "lasttoken" in himap_vlm.METHODS and "lasttoken" in registry.method_names()
    assert cls().image_tokens_schedule(576, 4) == [576, 576, 288, 288]
    spec = MethodSpec.parse("lasttoken(r=0.75)", num_layers=6)
    assert spec.build() == cls(k=2, r=0.75) and spec.slug == "lasttoken_k-2_r-0.75"
    assert [s.label for s in parse_methods("dense,lasttoken", num_layers=6)] == ["dense", "lasttoken"]
    model, proc = tiny("llama-mha")
    inputs = make_inputs(proc, [PROMPTS[0]], [[image_for(model, 0)]])
    with torch.no_grad(), cls(k=2, r=0.75)(model) as run:
        model(**inputs)
    n = run.image_tokens_per_layer[0][0]
    assert run.image_tokens_per_layer[2][0] == n - int(0.75 * n + 0.5)


def test_duplicate_names_and_aliases_are_refused(scratch_registry):
    from himap_vlm.core.interface import PruneStep
    from himap_vlm.core.methods.base import PruningMethod

    @dataclass(frozen=True)
    class Other(PruningMethod):
        def steps(self):
            return [PruneStep(1)]

    with pytest.raises(ValueError, match="'himap' is already registered by HiMAP"):
        registry.register("himap")(Other)
    with pytest.raises(ValueError, match="'randomprune' is already registered by RandomPrune"):
        registry.register("other", aliases=("randomprune",))(Other)
    with pytest.raises(ValueError, match="must be lowercase"):
        registry.register("Other")(Other)
    assert "other" not in registry.method_names()


def test_every_registered_method_declares_what_the_apps_read():
    for name in registry.method_names():
        cls = registry.get_method(name)
        assert cls.__doc__ and cls.__module__.startswith("himap_vlm.core.methods."), name
        for depth in (4, 8, 32):
            method = cls.for_depth(depth)
            method.validate_for_model(depth)
            for budget in cls.budgets(depth):
                cls(**budget)
            schedule = method.image_tokens_schedule(576, depth)
            assert schedule is None if method.dynamic else len(schedule) == depth
        for pname, p in cls.params().items():
            assert p.doc, f"{name}.{pname} has no doc"


def test_spec_errors_name_the_problem():
    with pytest.raises(MethodSpecError, match="unknown method 'himapp'"):
        MethodSpec.parse("himapp(k1=2)")
    with pytest.raises(MethodSpecError, match="does not take 'k'"):
        MethodSpec.parse("himap(k=2)")
    with pytest.raises(MethodSpecError, match="expected KEY=VALUE"):
        MethodSpec.parse("fastv(2)")
    with pytest.raises(MethodSpecError, match="k2=8 is out of range for this model"):
        MethodSpec.parse("himap(k2=8)", num_layers=6)
    assert MethodSpec.parse("himap", num_layers=8).build() == himap_vlm.HiMAP(k1=2, r1=0.5, k2=3, r2=0.75)
    assert MethodSpec.parse("random-prune", num_layers=32).name == "random"


def test_unregister_and_restored():
    from himap_vlm.core.methods.registry import restored, unregister

    with restored():
        unregister("randomprune")  # by alias: the method and every alias go
        assert "random" not in registry.method_names() and "randomprune" not in himap_vlm.METHODS
        with pytest.raises(ValueError, match="unknown method"):
            unregister("random")
    assert registry.get_method("random-prune") is himap_vlm.RandomPrune
