"""Equivalence tests of the pruning engine on tiny random LLaVA models (offline, CPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, SPECS, image_for, make_inputs, tiny
from himap_vlm import Dense, FastV, HiMAP, RandomPrune
from himap_vlm.core import contract
from himap_vlm.core.methods.base import kept_count
from reference import _positions, explicit_attention_maps, masked_reference_logits

METHOD_FACTORIES = {
    "himap": lambda L: HiMAP(k1=2, r1=0.5, k2=L - 2, r2=0.75),
    "himap-swapped": lambda L: HiMAP(k1=1, r1=0.4, k2=3, r2=0.5, swap_criteria=True),
    "fastv-last": lambda L: FastV(k=2, r=0.5),
    "fastv-mean": lambda L: FastV(k=3, r=0.7, criterion="mean_received"),
    "random": lambda L: RandomPrune(k=1, r=0.6, seed=3),
}


def num_layers(model) -> int:
    return model.config.text_config.num_hidden_layers


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def gen(model, inputs, n=4):
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1).float()


# ---------------------------------------------------------------------------------------------- r = 0
@pytest.mark.parametrize(
    "method",
    [HiMAP(k1=1, r1=0.0, k2=3, r2=0.0), FastV(k=2, r=0.0), RandomPrune(k=1, r=0.0), Dense()],
    ids=["himap", "fastv", "random", "dense"],
)
def test_prune_nothing_equals_dense(family_model, batch_inputs, method):
    name, model, proc = family_model
    inputs = batch_inputs(model, proc, n=3)
    with torch.no_grad():
        dense_logits = model(**inputs).logits
        dense_tokens, dense_scores = gen(model, inputs)
        with method(model) as run:
            logits = model(**inputs).logits
            tokens, scores = gen(model, inputs)
    torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(scores, dense_scores, rtol=0, atol=1e-6)
    assert torch.equal(tokens, dense_tokens)
    n_img = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert run.image_tokens_per_layer == [n_img] * num_layers(model)


# ---------------------------------------------------------------------------------------------- hooks
def test_hooks_are_removed_even_on_error(batch_inputs):
    model, proc = tiny("llama-mha")
    before = hook_count(model)
    with HiMAP(k1=1, r1=0.5, k2=3, r2=0.5)(model) as run:
        assert hook_count(model) > before
        assert run.active
    assert hook_count(model) == before and not run.active
    with pytest.raises(RuntimeError, match="boom"):
        with FastV(k=2, r=0.5)(model):
            raise RuntimeError("boom")
    assert hook_count(model) == before
    # the model is unchanged afterwards
    inputs = batch_inputs(model, proc)
    with torch.no_grad():
        a = model(**inputs).logits
        with FastV(k=2, r=0.5)(model):
            model(**inputs)
        b = model(**inputs).logits
    assert torch.equal(a, b)


def test_nested_methods_refused():
    model, _ = tiny("llama-mha")
    before = hook_count(model)
    with FastV(k=2, r=0.5)(model):
        with pytest.raises(RuntimeError, match="already active"):
            with HiMAP(k1=1, r1=0.5, k2=3, r2=0.5)(model):
                pass
    assert hook_count(model) == before


# ---------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("method_name", sorted(METHOD_FACTORIES))
def test_kept_counts_match_configuration(family_model, batch_inputs, method_name):
    name, model, proc = family_model
    method = METHOD_FACTORIES[method_name](num_layers(model))
    inputs = batch_inputs(model, proc, n=2)
    n_img = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    with torch.no_grad(), method(model) as run:
        model(**inputs)
    expected = method.image_tokens_schedule(n_img, num_layers(model))
    assert [counts[0] for counts in run.image_tokens_per_layer] == expected
    # positions only ever shrink, and non-image tokens are never dropped
    ids = inputs["input_ids"]
    for b in range(ids.shape[0]):
        text = set(torch.nonzero((ids[b] != model.config.image_token_id) & inputs["attention_mask"][b].bool()).flatten().tolist())
        prev = None
        for layer in run.layer_positions:
            pos = set(layer[b].tolist())
            assert text <= pos
            if prev is not None:
                assert pos <= prev
            prev = pos


def test_himap_counts_paper_setting():
    method = HiMAP(k1=2, r1=0.5, k2=8, r2=0.75)
    sched = method.image_tokens_schedule(576, 32)
    assert sched[:2] == [576, 576] and sched[2:8] == [288] * 6 and sched[8:] == [72] * 24
    assert kept_count(576, 0.5) == 288 and kept_count(288, 0.75) == 72


# ---------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("method_name", sorted(METHOD_FACTORIES))
def test_cached_generation_equals_masking_reference(family_model, batch_inputs, method_name):
    """KV-cache generation on physically shortened layers == full-length eager run with masked keys."""
    name, model, proc = family_model
    method = METHOD_FACTORIES[method_name](num_layers(model))
    inputs = batch_inputs(model, proc, n=2)
    with torch.no_grad(), method(model) as run:
        tokens, logits = gen(model, inputs, n=4)
    for t in range(tokens.shape[1]):
        ref = masked_reference_logits(model, inputs, run.layer_positions, tokens[:, :t])
        torch.testing.assert_close(logits[:, t], ref, rtol=1e-4, atol=1e-4)


def test_pruned_caches_are_shorter():
    model, proc = tiny("mistral-gqa")
    inputs = make_inputs(proc, [PROMPTS[0]], [[image_for(model, 0)]])
    s = inputs["input_ids"].shape[1]
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad(), FastV(k=2, r=0.5)(model):
        model(**inputs, **contract.cache_call_kwargs(model, cache), use_cache=True)
    lengths = [cache.layers[i].keys.shape[-2] for i in range(num_layers(model))]
    assert lengths[:2] == [s, s]
    assert all(length == s - (n_img - kept_count(n_img, 0.5)) for length in lengths[2:])


# ---------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method_name", ["himap", "fastv-mean", "random"])
def test_padded_batch_equals_per_sample(family_model, method_name, padding_side):
    name, model, proc = family_model
    method = METHOD_FACTORIES[method_name](num_layers(model))
    prompts = [PROMPTS[0], PROMPTS[1], "<image> <image> which is left ?", "how many objects are there ?"]
    images = [[image_for(model, 0)], [image_for(model, 1)], [image_for(model, 2), image_for(model, 3)], []]
    batch = make_inputs(proc, prompts, images, padding_side)
    mask = batch["attention_mask"].bool()
    with torch.no_grad(), method(model) as run:
        logits = model(**batch, position_ids=_positions(mask)).logits
    batch_counts = run.image_tokens_per_layer
    batch_positions = run.layer_positions
    for i, (p, im) in enumerate(zip(prompts, images, strict=True)):
        single = make_inputs(proc, [p], [im] if im else None)
        with torch.no_grad(), method(model) as run1:
            single_logits = model(**single).logits
        valid = torch.nonzero(mask[i]).flatten()
        torch.testing.assert_close(logits[i, valid], single_logits[0], rtol=1e-4, atol=1e-4)
        assert [c[i] for c in batch_counts] == [c[0] for c in run1.image_tokens_per_layer]
        offset = int(valid[0])
        for layer_b, layer_1 in zip(batch_positions, run1.layer_positions, strict=True):
            assert torch.equal(layer_b[i] - offset, layer_1[0])


def test_left_padded_generation_equals_per_sample():
    model, proc = tiny("qwen2-gqa")
    method = HiMAP(k1=2, r1=0.5, k2=4, r2=0.5)
    prompts = [PROMPTS[2], PROMPTS[1]]
    images = [[image_for(model, 0)], [image_for(model, 1)]]
    batch = make_inputs(proc, prompts, images)
    with torch.no_grad(), method(model):
        tokens, logits = gen(model, batch, n=5)
    for i in range(2):
        single = make_inputs(proc, [prompts[i]], [images[i]])
        with torch.no_grad(), method(model):
            t1, l1 = gen(model, single, n=5)
        assert torch.equal(tokens[i], t1[0])
        torch.testing.assert_close(logits[i], l1[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("method_name", ["himap", "fastv-last", "random"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_sdpa_equals_eager(name, method_name, batch_inputs):
    sdpa_model, proc = tiny(name, "sdpa")
    eager_model, _ = tiny(name, "eager")
    method = METHOD_FACTORIES[method_name](num_layers(sdpa_model))
    inputs = batch_inputs(sdpa_model, proc, n=3)
    outs = []
    for model in (sdpa_model, eager_model):
        with torch.no_grad(), method(model) as run:
            tokens, logits = gen(model, inputs, n=3)
        outs.append((tokens, logits, run.layer_positions))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)
    for la, lb in zip(outs[0][2], outs[1][2], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(la, lb, strict=True))


# ---------------------------------------------------------------------------------------------- scores
def _expected_keep(attn, ids, mask, image_id, queries, reduce, n_keep):
    """Kept image positions ranked from explicit attention maps (authors' approach), one sample."""
    a = attn.mean(0)  # (S, S) head mean
    s = ids.shape[0]
    img = (ids == image_id) & mask
    pos = torch.arange(s)
    last_img = int(pos[img].max())
    if queries == "instruction":
        rows = (pos > last_img) & mask
    elif queries == "image":
        rows = img
    elif queries == "last":
        rows = torch.zeros(s, dtype=torch.bool)
        rows[int(pos[mask].max())] = True
    else:
        rows = mask.clone()
    scores = a[rows][:, img].sum(0)
    if reduce == "mean":
        img_pos = pos[img]
        counts = torch.tensor([int((rows & (pos >= p)).sum()) for p in img_pos]).float()
        scores = scores / counts.clamp(min=1)
    order = torch.sort(scores, descending=True, stable=True).indices[:n_keep]
    return torch.sort(pos[img][order]).values


@pytest.mark.parametrize(
    "method,queries,reduce",
    [
        (FastV(k=2, r=0.5), "last", "sum"),
        (FastV(k=2, r=0.5, criterion="mean_received"), "all", "mean"),
        (HiMAP(k1=2, r1=0.5, k2=4, r2=0.5), "instruction", "sum"),
        (HiMAP(k1=2, r1=0.5, k2=4, r2=0.5, swap_criteria=True), "image", "sum"),
    ],
    ids=["fastv-last", "fastv-mean", "himap-shallow", "himap-swapped-shallow"],
)
@pytest.mark.parametrize("name", ["llama-mha", "qwen2-gqa"])
def test_scores_match_explicit_attention_maps(name, method, queries, reduce, batch_inputs):
    """The rows the engine recomputes give the same ranking as the eager attention maps."""
    model, proc = tiny(name)
    inputs = batch_inputs(model, proc, n=3)
    mask = inputs["attention_mask"].bool()
    maps = explicit_attention_maps(model, inputs)
    with torch.no_grad(), method(model) as run:
        model(**inputs, position_ids=_positions(mask))
    k = method.steps()[0].layer
    image_id = model.config.image_token_id
    for b in range(inputs["input_ids"].shape[0]):
        n_img = int(((inputs["input_ids"][b] == image_id) & mask[b]).sum())
        n_keep = run.image_tokens_per_layer[k][b]
        expected = _expected_keep(maps[k - 1][b], inputs["input_ids"][b], mask[b], image_id, queries, reduce, n_keep)
        got = run.layer_positions[k][b]
        got_img = got[inputs["input_ids"][b][got] == image_id]
        assert n_keep == kept_count(n_img, 0.5)
        assert torch.equal(got_img, expected)


# ---------------------------------------------------------------------------------------------- inputs
def test_text_only_passes_through():
    model, proc = tiny("llama-mha")
    inputs = make_inputs(proc, ["how many objects are there ?", "what is this ?"], None)
    with torch.no_grad():
        dense = model(**inputs).logits
        with HiMAP(k1=1, r1=0.9, k2=3, r2=0.9)(model) as run:
            pruned = model(**inputs).logits
    assert torch.equal(dense, pruned)
    assert all(c == [0, 0] for c in run.image_tokens_per_layer)


def test_output_keeps_input_length():
    model, proc = tiny("llama-mha")
    inputs = make_inputs(proc, [PROMPTS[0]], [[image_for(model, 0)]])
    with torch.no_grad(), HiMAP(k1=2, r1=0.5, k2=4, r2=0.75)(model):
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(out.logits).all()
