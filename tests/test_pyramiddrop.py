"""PyramidDrop: selection against explicit attention maps, renumbered positions against a hand-run model."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, image_for, make_inputs, tiny
from himap_vlm import PyramidDrop, get_method
from himap_vlm.core.families import resolve_family
from himap_vlm.models.tiny_families import FAMILY_BUILDERS, build_tiny_family
from reference import explicit_attention_maps, masked_reference_logits

PD = dict(k1=1, k2=3, k3=4, r=0.5)


def _inputs(model, proc, n=2, padding_side="left"):
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]][:n]
    return make_inputs(proc, prompts, [[image_for(model, i)] for i in range(n)], padding_side)


def _gen(model, inputs, n=3, **kw):
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True, **kw
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1).float()


def test_registry_schedule_and_validation():
    assert get_method("pdrop") is PyramidDrop
    schedule = PyramidDrop().image_tokens_schedule(576, 32)
    assert [schedule[i] for i in (7, 8, 15, 16, 23, 24, 31)] == [576, 288, 288, 144, 144, 72, 72]
    assert PyramidDrop(k3=None).image_tokens_schedule(576, 32)[-1] == 144
    assert PyramidDrop.for_depth(32) == PyramidDrop()
    with pytest.raises(ValueError, match="k2=8 must be greater than k1=8"):
        PyramidDrop(k1=8, k2=8)
    with pytest.raises(ValueError, match="positions must be one of"):
        PyramidDrop(positions="shift")
    model, _ = tiny("llama-mha")
    with pytest.raises(ValueError, match=r"k1=8 is out of range for this model"):
        PyramidDrop()(model)


def test_first_drop_ranks_by_the_pruning_layers_own_attention():
    """At k1 the kept set is the top of layer k1's attention (last token row, mean over heads) in a dense run."""
    model, proc = tiny("llama-mha")
    eager, _ = tiny("llama-mha", "eager")
    inputs = _inputs(model, proc, n=2)
    method = PyramidDrop(k1=2, k2=4, k3=None, r=0.5)
    with torch.no_grad(), method(model) as run:
        model(**inputs)
    maps = explicit_attention_maps(eager, inputs)  # dense: layer 2's input is the same before the drop
    image_id = model.config.image_token_id
    mask = inputs["attention_mask"].bool()
    for b in range(2):
        img = torch.nonzero((inputs["input_ids"][b] == image_id) & mask[b]).flatten()
        last = int(torch.nonzero(mask[b]).max())
        score = maps[2][b, :, last, img].mean(0)
        keep = int(img.numel() * 0.5)
        expected = torch.sort(img[torch.sort(score, descending=True, stable=True).indices[:keep]]).values
        got = run.layer_positions[2][b]
        assert torch.equal(got[torch.isin(got, img)], expected)
        assert run.image_tokens_per_layer[2][b] == keep and run.image_tokens_per_layer[4][b] == int(img.numel() * 0.25)


def _hand_run_renumbered(model, inputs, layer_positions):
    """Batch 1: layers by hand on the kept tokens, positions renumbered 0..n-1 after every drop."""
    fam = resolve_family(model)
    decoder = fam.decoder(model)
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]

    h0 = decoder.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h0.remove()
    h = captured["h"]
    pos = torch.arange(h.shape[1])[None]
    kept = torch.arange(h.shape[1])
    for i, layer in enumerate(decoder.layers):
        now = layer_positions[i][0]
        if not torch.equal(now, kept):
            keep = torch.isin(kept, now)
            h, kept = h[:, keep], kept[keep]
            pos = torch.arange(h.shape[1])[None]
        cos_sin = decoder.rotary_emb(h, pos)
        with torch.no_grad():
            out = layer(h, attention_mask=None, position_embeddings=cos_sin, position_ids=pos)
        h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(decoder.norm(h))[:, -1].float()


def test_renumbered_positions_equal_a_hand_run_and_differ_from_keep():
    model, proc = tiny("llama-mha")  # SDPA: causal without a mask in the hand run
    inputs = make_inputs(proc, [PROMPTS[0]], [[image_for(model, 0)]])
    with torch.no_grad(), PyramidDrop(**PD)(model) as run:
        logits = model(**inputs).logits[:, -1].float()
    ref = _hand_run_renumbered(model, inputs, run.layer_positions)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), PyramidDrop(**PD, positions="keep")(model) as run_keep:
        kept_logits = model(**inputs).logits[:, -1].float()
    assert [p.tolist() for p in run_keep.layer_positions[1]] == [p.tolist() for p in run.layer_positions[1]]
    assert (kept_logits - logits).abs().max() > 1e-4  # the position policy matters


def test_keep_positions_equal_the_masking_reference_in_cached_generation():
    model, proc = tiny("qwen2-gqa")
    inputs = _inputs(model, proc, n=3)
    with torch.no_grad(), PyramidDrop(**PD, positions="keep")(model) as run:
        tokens, logits = _gen(model, inputs)
    for t in range(tokens.shape[1]):
        ref = masked_reference_logits(model, inputs, run.layer_positions, tokens[:, :t])
        torch.testing.assert_close(logits[:, t], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positions", ["renumber", "compact", "keep"])
def test_no_cache_generation_equals_cached(positions):
    model, proc = tiny("mistral-gqa")
    inputs = _inputs(model, proc, n=2)
    method = PyramidDrop(**PD, positions=positions)
    with torch.no_grad():
        with method(model):
            cached = _gen(model, inputs)
        with method(model):
            no_cache = _gen(model, inputs, use_cache=False)
    assert torch.equal(cached[0], no_cache[0])
    torch.testing.assert_close(cached[1], no_cache[1], rtol=1e-4, atol=1e-4)


def test_renumber_and_compact_differ_only_in_decode_positions():
    model, proc = tiny("llama-mha")
    inputs = _inputs(model, proc, n=1)
    with torch.no_grad():
        with PyramidDrop(**PD, positions="renumber")(model):
            a = _gen(model, inputs, n=3)
        with PyramidDrop(**PD, positions="compact")(model):
            b = _gen(model, inputs, n=3)
    torch.testing.assert_close(a[1][:, 0], b[1][:, 0], rtol=0, atol=1e-6)  # same prefill
    assert (a[1][:, 1:] - b[1][:, 1:]).abs().max() > 1e-5  # decode positions differ


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_single_runs(padding_side):
    model, proc = tiny("qwen2-gqa")
    batch = _inputs(model, proc, n=3, padding_side=padding_side)
    mask = batch["attention_mask"].bool()
    method = PyramidDrop(**PD)
    with torch.no_grad(), method(model) as run:
        logits = model(**batch).logits
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    for i in range(3):
        single = make_inputs(proc, [prompts[i]], [[image_for(model, i)]])
        with torch.no_grad(), method(model) as run1:
            one = model(**single).logits
        valid = torch.nonzero(mask[i]).flatten()
        torch.testing.assert_close(logits[i, valid], one[0], rtol=1e-4, atol=1e-4)
        assert [c[i] for c in run.image_tokens_per_layer] == [c[0] for c in run1.image_tokens_per_layer]


@pytest.mark.parametrize("family", sorted(FAMILY_BUILDERS))
def test_runs_on_every_family(family):
    f = build_tiny_family(family)
    n = f.num_layers
    first = resolve_family(f.model).min_prune_layer(f.model.config)
    positions = "renumber" if resolve_family(f.model).renumber_positions else "keep"
    method = PyramidDrop(k1=max(1, first), k2=max(2, first + 1), k3=None, r=0.5, positions=positions)
    assert method.k2 < n
    inputs = f.inputs(["user : <image> what is in the picture ? assistant :", "<image> describe the image"], [[0], [1]])
    with torch.no_grad(), method(f.model) as run:
        out = f.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    for b in range(2):
        counts = [c[b] for c in run.image_tokens_per_layer]
        assert counts[method.k1] == int(counts[0] * 0.5) and counts[method.k2] == int(counts[0] * 0.25)
    if positions == "renumber":
        return
    with pytest.raises(ValueError, match="renumbering positions after a drop is not defined"):
        PyramidDrop(k1=max(1, first), k2=max(2, first + 1), k3=None)(f.model)
