"""Bad configurations and unsupported models raise clear ValueErrors (never asserts or index errors)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny
from himap_vlm import FastV, HiMAP, RandomPrune, get_method, supported_classes


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: HiMAP(k1=0, r1=0.5, k2=8, r2=0.5), r"k1=0 is out of range: it must be >= 1"),
        (lambda: HiMAP(k1=4, r1=0.5, k2=4, r2=0.5), r"k2=4 must be greater than k1=4"),
        (lambda: HiMAP(k1=4, r1=0.5, k2=2, r2=0.5), r"k2=2 must be greater than k1=4"),
        (lambda: HiMAP(k1=2, r1=1.5, k2=8, r2=0.5), r"r1=1.5 is out of range: it must be in \[0, 1\]"),
        (lambda: HiMAP(k1=2, r1=0.5, k2=8, r2=-0.1), r"r2=-0.1 is out of range"),
        (lambda: HiMAP(k1=2.5, r1=0.5, k2=8, r2=0.5), r"k1 must be an integer"),
        (lambda: HiMAP(k1=2, r1="half", k2=8, r2=0.5), r"r1 must be a number in \[0, 1\]"),
        (lambda: HiMAP(k1=2, r1=float("nan"), k2=8, r2=0.5), r"r1 must be a number"),
        (lambda: HiMAP(swap_criteria="yes"), r"swap_criteria must be True or False"),
        (lambda: FastV(k=0, r=0.5), r"k=0 is out of range"),
        (lambda: FastV(k=2, r=2), r"r=2 is out of range"),
        (lambda: FastV(k=2, r=0.5, criterion="first"), r"criterion must be one of 'last_token', 'mean_received'"),
        (lambda: RandomPrune(k=2, r=0.5, seed="x"), r"seed must be an integer"),
        (lambda: RandomPrune(k=True, r=0.5), r"k must be an integer"),
    ],
)
def test_bad_configs_raise_at_construction(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    "method,match",
    [
        (HiMAP(k1=2, r1=0.5, k2=6, r2=0.5), r"k2=6 is out of range for this model: it has 6 decoder layers, so k2 must be in \[1, 5\]"),
        (HiMAP(k1=7, r1=0.5, k2=9, r2=0.5), r"k1=7 is out of range for this model"),
        (FastV(k=32, r=0.5), r"k=32 is out of range for this model: it has 6 decoder layers"),
        (RandomPrune(k=6), r"k=6 is out of range"),
    ],
)
def test_configs_validated_against_model(method, match):
    model, _ = tiny("llama-mha")
    with pytest.raises(ValueError, match=match):
        method(model)


def test_unsupported_model_names_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=50))
    with pytest.raises(ValueError) as err:
        FastV(k=1, r=0.5)(model)
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg and "Supported model classes" in msg
    for cls in supported_classes():
        assert cls in msg


def test_unknown_method_name():
    with pytest.raises(ValueError, match="unknown method 'fastvv'; known methods: .*himap.*fastv"):
        get_method("fastvv")
    assert get_method("HiMAP") is HiMAP


def test_inputs_embeds_only_runs_unpruned_with_warning():
    model, proc = tiny("llama-mha")
    from conftest import PROMPTS, image_for, make_inputs

    inputs = make_inputs(proc, [PROMPTS[0]], [[image_for(model, 0)]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        dense = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        with pytest.warns(UserWarning, match="no input_ids"):
            with FastV(k=2, r=0.5)(model) as run:
                out = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    assert torch.equal(dense, out)
    assert run.image_tokens_per_layer == []


def test_static_cache_is_refused_with_a_clear_error():
    from conftest import PROMPTS, image_for, make_inputs

    model, proc = tiny("llama-mha")
    inputs = make_inputs(proc, [PROMPTS[0]], [[image_for(model, 0)]])
    with pytest.raises(ValueError, match="needs a plain DynamicCache.*StaticCache"):
        with torch.no_grad(), FastV(k=2, r=0.5)(model):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_generation_without_cache_and_with_beams_runs():
    from conftest import PROMPTS, image_for, make_inputs

    model, proc = tiny("llama-mha")
    inputs = make_inputs(proc, PROMPTS[:2], [[image_for(model, 0)], [image_for(model, 1)]])
    with torch.no_grad(), HiMAP(k1=2, r1=0.5, k2=4, r2=0.5)(model) as run:
        model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        assert run.num_prefills == 3  # no cache: every step re-prunes the whole sequence (as the reference code)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2)
    assert out.shape[0] == 2
