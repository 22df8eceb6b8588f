"""Documented behaviour for unusual calls: no-cache generation, aligned outputs, copies, bad input."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from conftest import PROMPTS, image_for, make_inputs, tiny
from himap_vlm import VTW, Dense, FastV, HiMAP, RandomPrune, VisiPruner
from himap_vlm.core.families import resolve_family


def _inputs(model, proc, prompts=None, images_per=None, padding_side="left"):
    prompts = prompts or PROMPTS[:2]
    images_per = images_per or [1] * len(prompts)
    images, k = [], 0
    for n in images_per:
        images.append([image_for(model, k + j) for j in range(n)])
        k += n
    return make_inputs(proc, prompts, images, padding_side)


def _gen(model, inputs, n=4, **kw):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)[:, inputs["input_ids"].shape[1] :]


# ------------------------------------------------------------------ 14.1: use_cache=False
@pytest.mark.parametrize("make", [lambda: HiMAP(k1=1, r1=0.5, k2=3, r2=0.5), lambda: FastV(k=2, r=0.75)])
def test_no_cache_generation_keeps_the_prefill_selection(make):
    """selection='once' (default): use_cache=False gives the cached tokens; every step reuses the choice."""
    model, proc = tiny("llama-mha")
    inputs = _inputs(model, proc)
    s = inputs["input_ids"].shape[1]
    with torch.no_grad():
        with make()(model) as run:
            cached = _gen(model, inputs, use_cache=True)
            chosen = [[p.clone() for p in layer] for layer in run.layer_positions]
        with make()(model) as run:
            no_cache = _gen(model, inputs, use_cache=False)
            assert run.num_prefills == 4 and run.record["selection"] == {"mode": "once", "reused": True}
            last = run.layer_positions
    assert torch.equal(cached, no_cache)
    for a_layer, b_layer in zip(chosen, last, strict=True):  # the last forward kept the prefill's tokens
        for a, b in zip(a_layer, b_layer, strict=True):
            assert torch.equal(a, b[b < s])


def test_every_forward_reselects_at_every_no_cache_step():
    """selection='every_forward' (the authors' code) chooses again at every no-cache step."""
    model, proc = tiny("llama-mha")
    inputs = _inputs(model, proc)
    method = HiMAP(k1=1, r1=0.75, k2=3, r2=0.5)
    seen = []
    with torch.no_grad(), method(model, selection="every_forward") as run:

        def spy(module, args, output):
            seen.append(dict(run.record["selection"]))

        handle = model.register_forward_hook(spy)
        try:
            _gen(model, inputs, n=4, use_cache=False)
        finally:
            handle.remove()
    assert seen == [{"mode": "every_forward", "reused": False}] * 4
    assert len(seen) == 4 and run.num_prefills == 4
    with pytest.raises(ValueError, match="selection must be one of"):
        method(model, selection="sometimes")


def test_no_cache_chat_continuation_is_a_new_selection():
    """A forward that extends the last one by more than one token is a new prefill, not a replay."""
    model, proc = tiny("llama-mha")
    inputs = _inputs(model, proc)
    with torch.no_grad(), FastV(k=2, r=0.5)(model) as run:
        model(**inputs, use_cache=False)
        ids = torch.cat([inputs["input_ids"], inputs["input_ids"][:, -3:]], dim=1)
        mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"][:, -3:]], dim=1)
        model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=False)
        assert run.record["selection"]["reused"] is False


# ------------------------------------------------------------------ 14.2: aligned per-layer outputs
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hidden_states_and_attentions_line_up_with_input_ids(attn):
    model, proc = tiny("qwen2-gqa", attn)
    inputs = _inputs(model, proc, PROMPTS[:3], [1, 1, 1])
    b, s = inputs["input_ids"].shape
    layers = model.config.text_config.num_hidden_layers
    with torch.no_grad(), HiMAP(k1=1, r1=0.5, k2=3, r2=0.75)(model) as run:
        out = model(**inputs, output_hidden_states=True, output_attentions=(attn == "eager"))
    assert len(out.hidden_states) == layers + 1
    for h in out.hidden_states:
        assert h.shape[:2] == (b, s)
    torch.testing.assert_close(out.hidden_states[-1], run_last_hidden(model, inputs, run))
    pad = ~inputs["attention_mask"].bool()
    last = out.hidden_states[-1]  # = last_hidden_state: dropped tokens keep the state they left with
    assert torch.all(last[pad] == 0) and torch.all(last[~pad].abs().sum(-1) > 0)
    first_drop = 1  # HiMAP(k1=1): layer 0 runs on the full input and returns the model's own tensors
    with torch.no_grad():
        dense = model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[0], dense.hidden_states[0], rtol=0, atol=0)
    torch.testing.assert_close(out.hidden_states[1], dense.hidden_states[1], rtol=0, atol=0)
    for layer in range(first_drop, layers - 1):
        h = out.hidden_states[layer + 1]
        for i in range(b):
            processed = torch.zeros(s, dtype=torch.bool)
            processed[run.layer_positions[layer][i]] = True
            assert torch.all(h[i][~processed] == 0)  # not processed by this layer, or padding: 0
            assert torch.all(h[i][processed].abs().sum(-1) > 0)
        assert torch.all(h[pad] == 0)
    if attn == "eager":
        assert len(out.attentions) == layers
        assert torch.equal(out.attentions[0], dense_attentions0(model, inputs))  # the model's own map
        for layer, a in enumerate(out.attentions):
            assert a.shape == (b, model.config.text_config.num_attention_heads, s, s)
            for i in range(b):
                rows = run.layer_positions[layer][i]
                sums = a[i][:, rows].sum(-1)
                torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


def dense_attentions0(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_attentions=True).attentions[0]


def run_last_hidden(model, inputs, run):
    """The final hidden states the language model returned (already aligned by the run)."""
    fam = resolve_family(model)
    captured = {}
    def grab(module, args, output):
        captured["h"] = output.last_hidden_state

    with torch.no_grad(), type(run.method)(**run.method.config)(model):
        handle = fam.decoder(model).register_forward_hook(grab)  # after the run's own output hook
        try:
            model(**inputs)
        finally:
            handle.remove()
    return captured["h"]


def test_prune_nothing_outputs_equal_dense_even_with_hidden_states():
    model, proc = tiny("llama-mha")
    inputs = _inputs(model, proc)
    with torch.no_grad():
        dense = model(**inputs, output_hidden_states=True)
        with FastV(k=2, r=0.0)(model):
            same = model(**inputs, output_hidden_states=True)
    for a, b in zip(dense.hidden_states, same.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ 14.3: no instruction tokens
def test_himap_without_instruction_tokens_warns_and_keeps_the_first_tokens():
    model, proc = tiny("llama-mha")
    inputs = _inputs(model, proc, ["describe this : <image>"])
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad(), HiMAP(k1=1, r1=0.5, k2=3, r2=0.5)(model) as run:
        with pytest.warns(UserWarning, match="no instruction token after its last image"):
            model(**inputs)
    img = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    kept = run.layer_positions[1][0]
    kept_img = kept[torch.isin(kept, img)]
    assert torch.equal(kept_img, img[: n_img - n_img // 2])  # the first tokens in sequence order


# ------------------------------------------------------------------ 14.4 / 14.5 / 14.6: bad input
def test_empty_input_ids_is_a_clear_error():
    model, _ = tiny("llama-mha")
    with FastV(k=2, r=0.5)(model), pytest.raises(ValueError, match="input_ids is empty"):
        model(input_ids=torch.zeros(2, 0, dtype=torch.long))


def test_numpy_and_torch_scalars_are_accepted_as_parameters():
    m = FastV(k=np.int64(2), r=np.float32(0.5))
    assert m == FastV(k=2, r=0.5) and type(m.k) is int and type(m.r) is float
    assert HiMAP(k1=np.int32(1), r1=np.float64(0.25), k2=torch.tensor(3), r2=torch.tensor(0.5)).k2 == 3
    assert RandomPrune(seed=np.uint8(3)).seed == 3
    for r in np.linspace(0, 1, 5):
        FastV(k=2, r=r)
    with pytest.raises(ValueError, match=r"k must be an integer layer index >= 1 .*got 2\.5"):
        FastV(k=2.5)
    with pytest.raises(ValueError, match=r"pass int\(2\.0\)"):
        VTW(k=np.float64(2.0))


def test_image_token_id_outside_the_vocabulary_is_refused_when_applied():
    model, _ = tiny("llama-mha")
    saved = model.config.image_token_id
    model.config.image_token_id = model.config.text_config.vocab_size + 5
    try:
        with pytest.raises(ValueError, match="image_token_id=.* is not a token of the language model"):
            FastV(k=2, r=0.5)(model)
    finally:
        model.config.image_token_id = saved


# ------------------------------------------------------------------ 19.1: deepcopy inside a block
def test_deepcopy_inside_a_block_carries_an_independent_run_that_leaves_with_it():
    model, proc = tiny("llama-mha")
    inputs = _inputs(model, proc)
    method = FastV(k=2, r=0.5)
    hooks = _hook_count(model)
    with torch.no_grad():
        with method(model) as run:
            expected = model(**inputs).logits
            clone = copy.deepcopy(model)
            got = clone(**inputs).logits
            (child,) = clone._himap_runs
            assert child is not run and child.active and child.image_tokens_per_layer[-1] == run.image_tokens_per_layer[-1]
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
            assert _hook_count(model) == _hook_count(clone)
        assert _hook_count(model) == hooks and _hook_count(clone) == hooks
        assert not child.active and clone._himap_runs == []
        dense = clone(**inputs).logits
        with Dense()(clone):  # the copy takes a new method afterwards
            pass
    assert not torch.allclose(dense, expected)


def test_deepcopy_outside_a_block_has_no_hooks():
    model, _ = tiny("llama-mha")
    hooks = _hook_count(model)
    clone = copy.deepcopy(model)
    assert _hook_count(clone) == hooks and not getattr(clone, "_himap_runs", [])


def _hook_count(model) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()
    )


# ------------------------------------------------------------------ 19.2: padding positions
def test_padding_positions_are_zero_and_kernels_agree_where_samples_keep_different_counts():
    """Samples with 1 and 3 images keep different numbers of tokens: eager and SDPA still agree everywhere."""
    prompts = [PROMPTS[0], "<image> <image> <image> describe the image"]
    outs = {}
    for attn in ("eager", "sdpa"):
        model, proc = tiny("mistral-gqa", attn)
        inputs = _inputs(model, proc, prompts, [1, 3])
        with torch.no_grad(), FastV(k=2, r=0.5)(model) as run:
            out = model(**inputs, output_hidden_states=True)
        assert len(set(run.image_tokens_per_layer[-1])) == 2  # different kept counts
        pad = ~inputs["attention_mask"].bool()
        assert pad.any()
        for h in out.hidden_states[3:]:  # layers from the drop at k=2 on (entry l + 1 is layer l)
            assert torch.all(h[pad] == 0)
        outs[attn] = out
    for a, b in zip(outs["eager"].hidden_states, outs["sdpa"].hidden_states, strict=True):
        real = ~pad[..., None].expand_as(a)  # before the drop, padding rows are the kernels' own
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-4)
    for a, b in zip(outs["eager"].hidden_states[3:], outs["sdpa"].hidden_states[3:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs["eager"].logits, outs["sdpa"].logits, atol=1e-5, rtol=1e-4)


def test_visipruner_record_survives_a_reused_selection():
    model, proc = tiny("llama-mha")
    inputs = _inputs(model, proc)
    method = VisiPruner(shallow_layers=1, cosine_threshold=0.9999, l2_threshold=0.0, exit_threshold=0.99999)
    with torch.no_grad(), warnings.catch_warnings(), method(model) as run:
        warnings.simplefilter("ignore")
        _gen(model, inputs, n=3, use_cache=False)
        assert run.record["selection"]["reused"] and "visipruner" in run.record


def test_retained_gradients_reach_the_returned_early_layer_tensors():
    """transformers' test_retain_grad_hidden_states_attentions under real pruning."""
    model, proc = tiny("llama-mha", "eager")
    inputs = _inputs(model, proc)
    with FastV(k=2, r=0.5)(model):
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        hidden, attn = out.hidden_states[0], out.attentions[0]
        hidden.retain_grad()
        attn.retain_grad()
        out.hidden_states[-1].retain_grad()
        out.logits.float().sum().backward()
    assert hidden.grad is not None and attn.grad is not None and out.hidden_states[-1].grad is not None
    model.zero_grad(set_to_none=True)
