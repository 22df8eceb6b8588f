"""The transformers contract: one module owns it, breaks are loud, versions are declared and tested."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from conftest import PROMPTS, image_for, make_inputs, tiny
from himap_vlm import Dense, FastV, HiMAP
from himap_vlm.core import contract
from himap_vlm.core.families import resolve_family

ROOT = Path(__file__).resolve().parents[1]


def _inputs(model, proc, n: int = 1):
    return make_inputs(proc, PROMPTS[:n], [[image_for(model, i)] for i in range(n)])


def _layers(model):
    fam = resolve_family(model)
    return getattr(fam.decoder(model), fam.layers_attr), fam


# ------------------------------------------------------------------------- one owner
def test_no_module_outside_the_contract_reads_transformers_internals():
    """Cache kwargs, mask builders, cache layers, private paths: only contract.py names them."""
    patterns = {
        "cache keyword": re.compile(r"""["']past_key_values["']|past_key_values\s*=|\.past_key_values\b"""),
        "mask builders": re.compile(r"masking_utils"),
        "cache internals": re.compile(r"cache_utils|\.get_seq_length\(|\.get_mask_sizes\("),
        "private import paths": re.compile(r"transformers\.models\.[a-z0-9_]+\.(modeling|configuration|image_processing)_"),
        "private config fields": re.compile(r"\._attn_implementation\b"),
    }
    offenders = []
    for path in sorted((ROOT / "src" / "himap_vlm").rglob("*.py")):
        if path.name == "contract.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("#"):
                continue
            for what, pat in patterns.items():
                if pat.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {what}: {stripped}")
    assert not offenders, "\n".join(offenders)


# ------------------------------------------------------------------------- versions
def test_declared_floor_and_pin_match_the_tested_range():
    spec = re.search(r'"(transformers[^"]*)"', (ROOT / "pyproject.toml").read_text()).group(1)
    floor = re.search(r">=\s*([0-9.]+)", spec).group(1)
    assert Version(floor) == Version(contract.TESTED_MIN), spec
    pins = dict(
        line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    assert Version(pins["transformers"]) == Version(contract.TESTED_MAX)
    assert "://" not in (ROOT / "constraints.txt").read_text()  # versions only, no registry addresses


def test_newer_release_warns_once_and_older_is_refused(monkeypatch):
    model, _ = tiny("llama-mha")
    monkeypatch.setattr(contract, "_warned_untested", False)
    monkeypatch.setattr(contract, "_version", lambda: Version("99.1.0"))
    with pytest.warns(contract.UntestedTransformersWarning, match=r"tested with transformers .* you have"):
        FastV(k=2, r=0.5)(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", contract.UntestedTransformersWarning)
        FastV(k=2, r=0.5)(model)  # once per process
    monkeypatch.setattr(contract, "_version", lambda: Version("5.0.0"))
    with pytest.raises(contract.ContractError, match=r"transformers >= .* is required"):
        FastV(k=2, r=0.5)(model)


# ------------------------------------------------------------------------- checked when applied
def test_signature_break_is_refused_when_the_method_is_applied():
    model, _ = tiny("llama-mha")
    layers, fam = _layers(model)
    attn = getattr(layers[0], fam.attn_attr)
    original = type(attn)

    class Renamed(original):  # an attention module that takes the cache under another name
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, kv_store=None, **kwargs):
            return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)

    attn.__class__ = Renamed
    try:
        with pytest.raises(contract.ContractError, match=r"an attention module .*Renamed.* accepts") as err:
            HiMAP(k1=1, r1=0.5, k2=2, r2=0.5)(model)
        assert contract.transformers_version() in str(err.value)
    finally:
        attn.__class__ = original


def test_missing_projection_is_refused_for_scoring_methods_only():
    model, _ = tiny("llama-mha")
    layers, fam = _layers(model)
    attn = getattr(layers[0], fam.attn_attr)
    v = attn.v_proj
    del attn.v_proj
    try:
        with pytest.raises(contract.ContractError, match="v_proj"):
            FastV(k=2, r=0.5)(model)
        Dense()(model)  # needs no projections
    finally:
        attn.v_proj = v


# ------------------------------------------------------------------------- checked at run time
def _rename_cache_before_engine(module, new_name: str):
    def hook(mod, args, kwargs):
        for name in contract.CACHE_KWARGS:
            if name in kwargs:
                kwargs[new_name] = kwargs.pop(name)
        return args, kwargs

    return module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


def test_layer_receiving_the_cache_under_an_unknown_name_is_a_loud_error():
    """A renamed keyword must raise, not turn decode steps into silent new prefills."""
    model, proc = tiny("llama-mha")
    layers, _ = _layers(model)
    inputs = _inputs(model, proc)
    handle = _rename_cache_before_engine(layers[3], "kv_store")
    try:
        with FastV(k=2, r=0.5)(model), pytest.raises(contract.ContractError) as err:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    text = str(err.value)
    assert "decoder layer 3" in text and "kv_store" in text and contract.transformers_version() in text


def test_language_model_receiving_the_cache_under_an_unknown_name_is_a_loud_error():
    model, proc = tiny("llama-mha")
    inputs = _inputs(model, proc)
    handle = _rename_cache_before_engine(resolve_family(model).decoder(model), "kv_store")
    try:
        with HiMAP(k1=1, r1=0.5, k2=3, r2=0.5)(model), pytest.raises(contract.ContractError, match="language model"):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()


def test_hidden_length_disagreeing_with_the_layout_is_a_loud_error():
    model, proc = tiny("llama-mha")
    layers, _ = _layers(model)
    inputs = _inputs(model, proc)

    def drop_one(mod, args, kwargs):
        hidden = contract.layer_hidden(args, kwargs, "test")
        return contract.with_layer_hidden(args, kwargs, hidden[:, 1:])

    handle = layers[4].register_forward_pre_hook(drop_one, with_kwargs=True, prepend=True)
    try:
        with FastV(k=2, r=0.5)(model), pytest.raises(contract.ContractError, match="decoder layer 4 receives"):
            model(**inputs)
    finally:
        handle.remove()


def test_continuation_without_a_cache_is_a_loud_error():
    model, proc = tiny("llama-mha")
    inputs = _inputs(model, proc)
    ids = inputs["input_ids"]
    longer = torch.cat([inputs["attention_mask"], inputs["attention_mask"][:, :1]], dim=1)
    with FastV(k=2, r=0.5)(model), pytest.raises(contract.ContractError, match="continuation step"):
        model(input_ids=ids[:, -1:], attention_mask=longer[:, -ids.shape[1] - 1 :], use_cache=True)


# ------------------------------------------------------------------------- no deprecated calls
def test_pruned_generation_and_decode_loop_emit_no_deprecation_warnings():
    from himap_vlm.apps.bench.runner import greedy_generate

    model, proc = tiny("qwen2-gqa")
    inputs = _inputs(model, proc, n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with torch.no_grad(), HiMAP(k1=1, r1=0.5, k2=3, r2=0.5)(model):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            tokens, _ = greedy_generate(model, inputs, 3)
    assert tokens.shape == (2, 3)


def test_output_cache_and_cache_call_kwargs_follow_the_installed_release():
    model, proc = tiny("llama-mha")
    inputs = _inputs(model, proc)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = contract.output_cache(out)
        kwargs = contract.cache_call_kwargs(model, cache)
    assert list(kwargs) == [contract.model_cache_kwarg(model)]
    assert contract.cache_length(cache) == inputs["input_ids"].shape[1]
    with pytest.raises(contract.ContractError, match="carries its KV cache"):
        contract.output_cache({"logits": out.logits})
