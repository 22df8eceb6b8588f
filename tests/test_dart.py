"""DART: pivots and duplication against an independent computation; no attention weights needed."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import PROMPTS, image_for, make_inputs, tiny
from himap_vlm import DART, get_method
from himap_vlm.core.engine import scoring
from himap_vlm.core.families import resolve_family
from himap_vlm.models.tiny_families import FAMILY_BUILDERS, build_tiny_family
from reference import _positions, masked_reference_logits


def _inputs(model, proc, prompts=None, padding_side="left"):
    prompts = prompts or [PROMPTS[0], PROMPTS[2]]
    return make_inputs(proc, prompts, [[image_for(model, i)] for i in range(len(prompts))], padding_side)


def _gen(model, inputs, n=3, **kw):
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True, **kw
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1).float()


def test_registry_and_budget():
    assert get_method("dart") is DART
    assert DART().image_tokens_schedule(576, 32)[:3] == [576, 576, 132]  # the authors' 4 + 8 x 16
    with pytest.raises(ValueError, match="at least 1"):
        DART(image_pivots=0, text_pivots=0)
    assert DART().steps()[0].score is None  # no attention weights


@torch.no_grad()
def _reference_keep(model, inputs, k, r, n_img_piv, n_txt_piv, b):
    """DART written out from a dense run: keys of layer k-1, outputs of layer k-1 through the final norm."""
    fam = resolve_family(model)
    decoder = fam.decoder(model)
    seen = {}

    def attn_pre(module, args, kwargs):
        seen["attn_in"] = kwargs["hidden_states"]
        seen["pos"] = kwargs["position_embeddings"]

    def layer_pre(module, args, kwargs):
        seen["layer_in"] = args[0] if args else kwargs["hidden_states"]

    hooks = [
        decoder.layers[k - 1].self_attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
        decoder.layers[k].register_forward_pre_hook(layer_pre, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    attn = decoder.layers[k - 1].self_attn
    x = seen["attn_in"][b : b + 1]
    cos, sin = (t[b : b + 1] if t.shape[0] > 1 else t for t in seen["pos"])
    q = attn.q_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    key = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    _, key = apply_rotary_pos_emb(q, key, cos, sin)
    norms = key[0].transpose(0, 1).reshape(x.shape[1], -1).abs().sum(-1)  # (S,)
    hidden = torch.nn.functional.normalize(decoder.norm(seen["layer_in"][b]).float(), dim=-1)
    ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
    img = torch.nonzero((ids == model.config.image_token_id) & mask).flatten()
    after = torch.nonzero((torch.arange(ids.numel()) > img.max()) & mask).flatten()
    n = img.numel()
    budget = n - int(r * n + 0.5)
    img_piv = sorted(img.tolist(), key=lambda p: (-float(norms[p]), p))[: min(n_img_piv, budget)]
    txt_piv = sorted(after.tolist(), key=lambda p: (-float(norms[p]), p))[:n_txt_piv]
    kept = set(img_piv)
    pivots = img_piv + txt_piv
    share, extra = divmod(budget - len(kept), len(pivots))
    for i, p in enumerate(pivots):
        want = share + (1 if i < extra else 0)
        cands = [c for c in img.tolist() if c not in kept]
        sims = {c: float(hidden[c] @ hidden[p]) for c in cands}
        kept |= set(sorted(cands, key=lambda c: (sims[c], c))[:want])
    return sorted(kept)


@pytest.mark.parametrize("name", ["llama-mha", "qwen2-gqa"])
def test_kept_tokens_equal_an_independent_computation(name):
    model, proc = tiny(name)
    inputs = _inputs(model, proc)
    method = DART(k=2, r=0.6, image_pivots=2, text_pivots=3)
    with torch.no_grad(), method(model) as run:
        model(**inputs)
    img_id = model.config.image_token_id
    for b in range(2):
        got = run.layer_positions[2][b]
        img = (inputs["input_ids"][b] == img_id).nonzero().flatten()
        expected = _reference_keep(model, inputs, 2, 0.6, 2, 3, b)
        assert got[torch.isin(got, img)].tolist() == expected


def test_runs_without_any_attention_weights(monkeypatch):
    model, proc = tiny("mistral-gqa")  # SDPA everywhere, no row recomputed
    inputs = _inputs(model, proc)

    def forbidden(*a, **k):
        raise AssertionError("DART must not recompute attention rows")

    monkeypatch.setattr(scoring, "attention_rows", forbidden)
    with torch.no_grad(), DART(k=2)(model) as run:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert all(c < run.image_tokens_per_layer[0][0] for c in run.image_tokens_per_layer[-1][:1])


def test_cached_generation_equals_masking_reference():
    model, proc = tiny("qwen2-gqa")
    inputs = _inputs(model, proc, [PROMPTS[0], PROMPTS[1], PROMPTS[2]])
    with torch.no_grad(), DART(k=2, r=0.5)(model) as run:
        tokens, logits = _gen(model, inputs)
    for t in range(tokens.shape[1]):
        ref = masked_reference_logits(model, inputs, run.layer_positions, tokens[:, :t])
        torch.testing.assert_close(logits[:, t], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_single_runs(padding_side):
    model, proc = tiny("llama-mha")
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    batch = _inputs(model, proc, prompts, padding_side)
    mask = batch["attention_mask"].bool()
    method = DART(k=2, r=0.7)
    # the samples' own positions (as generate computes them): post-RoPE key norms depend on them
    with torch.no_grad(), method(model) as run:
        logits = model(**batch, position_ids=_positions(mask)).logits
    for i, p in enumerate(prompts):
        single = make_inputs(proc, [p], [[image_for(model, i)]])
        with torch.no_grad(), method(model) as run1:
            one = model(**single).logits
        valid = torch.nonzero(mask[i]).flatten()
        torch.testing.assert_close(logits[i, valid], one[0], rtol=1e-4, atol=1e-4)
        offset = int(valid[0])
        assert torch.equal(run.layer_positions[2][i] - offset, run1.layer_positions[2][0])


@pytest.mark.parametrize("family", sorted(FAMILY_BUILDERS))
def test_runs_on_every_family(family):
    f = build_tiny_family(family)
    first = resolve_family(f.model).min_prune_layer(f.model.config)
    method = DART(k=max(2, first), r=0.5)
    inputs = f.inputs(["user : <image> what is in the picture ? assistant :", "<image> describe the image"], [[0], [1]])
    with torch.no_grad(), method(f.model) as run:
        out = f.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    for b in range(2):
        counts = [c[b] for c in run.image_tokens_per_layer]
        n = counts[0]
        assert counts[method.k] == n - int(0.5 * n + 0.5)
