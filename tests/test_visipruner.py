"""VisiPruner on the shared engine (tiny offline LLaVA models, CPU).

Checked against independent computations: the influence measure against an explicit eager
attention map with one weight zeroed, the shallow-stage edits against explicit (B, H, T, T)
attention matrices edited and multiplied by V, and whole runs against the masking reference.
"""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, SPECS, image_for, make_inputs, tiny
from himap_vlm import Dense, VisiPruner, get_method
from himap_vlm.core.engine import LastTokenContributions
from himap_vlm.core.interface import AttentionEdit
from reference import _positions, explicit_attention_maps, masked_reference_logits

NO_OP = dict(shallow_layers=0, cosine_threshold=-1.0)
# thresholds that fire on the tiny random models (their contributions are ~0.05-0.3 in norm):
# filtering at layer 2 or 3 with partial keeps, and some vision exits
_L2 = {"llama-mha": 0.1, "mistral-gqa": 0.15, "qwen2-gqa": 0.1}


def firing(name: str) -> dict:
    return dict(shallow_layers=2, cosine_threshold=0.9999, l2_threshold=_L2[name], exit_threshold=0.9998, exit_patience=1)


def num_layers(model) -> int:
    return model.config.text_config.num_hidden_layers


def gen(model, inputs, n=4):
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1).float()


def shallow_edit(inputs, image_id: int, shallow_layers: int, sink_index: int = 0, variant: str = "merge"):
    """The shallow stage written on explicit post-softmax matrices (B, H, T, T), as the authors' code.

    Only prompt queries are edited (generated tokens attend normally); ``variant`` is ``"merge"``
    (7B: layer 0 merges text->image mass onto the sink and zeroes image->image) or ``"drop_half"``
    (13B: layer 0 zeroes image->image and text->first half of the image tokens).
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    img_prompt = (ids == image_id) & mask
    s = ids.shape[1]

    def edit(layer: int, w: torch.Tensor):
        if layer >= shallow_layers:
            return None
        b, _, t, _ = w.shape
        img = torch.zeros(b, t, dtype=torch.bool)
        img[:, :s] = img_prompt  # generated tokens are text
        prompt_rows = torch.arange(t) < s
        text_q = (~img) & prompt_rows[None]
        keys = img
        if layer == 0 and variant == "drop_half":
            rank = torch.cumsum(img.long(), dim=1) - 1
            keys = img & (rank < (img.sum(1) // 2)[:, None])
        text_to_img = text_q[:, None, :, None] & keys[:, None, None, :]
        out = w.masked_fill(text_to_img, 0.0)
        if layer == 0:
            if variant == "merge":
                mass = (w * text_to_img).sum(-1)  # (B, H, T): each text query's total weight on images
                for i in range(b):
                    if img[i].any():
                        out[i, :, :, torch.nonzero(img[i]).flatten()[sink_index]] += mass[i]
            out = out.masked_fill(img[:, None, :, None] & img[:, None, None, :], 0.0)
        return out

    return edit


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(shallow_layers=-1), "shallow_layers"),
        (dict(shallow_layers=1.5), "shallow_layers"),
        (dict(cosine_threshold=1.5), "cosine_threshold"),
        (dict(cosine_threshold=float("nan")), "cosine_threshold"),
        (dict(l2_threshold=-0.1), "l2_threshold"),
        (dict(l2_threshold="0.2"), "l2_threshold"),
        (dict(exit_threshold=-2), "exit_threshold"),
        (dict(exit_patience=0), "exit_patience"),
        (dict(exit_patience=True), "exit_patience"),
        (dict(sink_index=-1), "sink_index"),
    ],
)
def test_config_is_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        VisiPruner(**kwargs)


def test_config_against_model_and_registry():
    model, _ = tiny("llama-mha")
    with pytest.raises(ValueError, match=r"shallow_layers=6 is out of range.*\[0, 5\]"):
        VisiPruner(shallow_layers=6)(model)
    method = get_method("visipruner")(shallow_layers=3, exit_patience=None)
    assert method.exit_patience is None
    assert method.image_tokens_schedule(576, 32) is None  # input-dependent
    edits = VisiPruner(shallow_layers=3, sink_index=2).attention_edits()
    assert edits == {
        0: AttentionEdit("merge", "drop", sink=2),
        1: AttentionEdit("drop", "keep"),
        2: AttentionEdit("drop", "keep"),
    }
    assert VisiPruner(shallow_layers=0).attention_edits() == {}


# ---------------------------------------------------------------------------------------------- no-op
def test_noop_configuration_equals_dense(family_model, batch_inputs):
    name, model, proc = family_model
    inputs = batch_inputs(model, proc, n=3)
    with torch.no_grad():
        dense_logits = model(**inputs).logits
        dense_tokens, dense_scores = gen(model, inputs)
        with VisiPruner(**NO_OP)(model) as run:
            logits = model(**inputs).logits
            tokens, scores = gen(model, inputs)
    torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(scores, dense_scores, rtol=0, atol=1e-6)
    assert torch.equal(tokens, dense_tokens)
    n_img = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert run.image_tokens_per_layer == [n_img] * num_layers(model)
    assert [r["filtering_layer"] for r in run.record["visipruner"]] == [None] * 3


# ---------------------------------------------------------------------------------------------- influence
class _Probe(VisiPruner):
    """Records the engine's contributions at every layer, decides nothing."""

    def __init__(self):
        super().__init__(**NO_OP)
        self.seen: dict[int, LastTokenContributions] = {}

    def on_layer(self, layer, view):
        self.seen[layer] = view.last_token_contributions()
        return None


@pytest.mark.parametrize("name", ["llama-mha", "qwen2-gqa"])
def test_influence_equals_recomputation_with_one_weight_zeroed(name, batch_inputs):
    """o_last - c_j == attention output of the last token with a[h, last, j] = 0 in every head."""
    model, proc = tiny(name)
    eager, _ = tiny(name, "eager")
    inputs = batch_inputs(model, proc, n=2)
    mask = inputs["attention_mask"].bool()
    probe = _Probe()
    with torch.no_grad(), probe(model):
        model(**inputs, position_ids=_positions(mask))
    maps = explicit_attention_maps(eager, inputs)  # (B, H, S, S) per layer
    # the attention input of every layer and the real attention output before o_proj (dense run)
    captured: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for li, layer in enumerate(eager.model.language_model.layers):
        attn = layer.self_attn

        def pre(module, args, kwargs, _li=li):
            captured.setdefault(_li, {})["hidden"] = kwargs["hidden_states"]

        def o_pre(module, args, _li=li):
            captured.setdefault(_li, {})["o"] = args[0]

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attn.o_proj.register_forward_pre_hook(o_pre))
    try:
        with torch.no_grad():
            eager(**inputs, position_ids=_positions(mask))
    finally:
        for h in handles:
            h.remove()
    image_id = model.config.image_token_id
    checked = 0
    for layer in (1, num_layers(model) - 2):
        attn = eager.model.language_model.layers[layer].self_attn
        with torch.no_grad():
            h = captured[layer]["hidden"]
            v = attn.v_proj(h).view(h.shape[0], h.shape[1], -1, attn.head_dim).transpose(1, 2)
            v = v.repeat_interleave(maps[layer].shape[1] // v.shape[1], dim=1).float()  # (B, H, S, hd)
        c = probe.seen[layer]
        for b in range(inputs["input_ids"].shape[0]):
            last = int(torch.nonzero(mask[b]).max())
            a_last = maps[layer][b, :, last, :]  # (H, S)
            o = torch.einsum("hs,hsd->hd", a_last, v[b]).reshape(-1)
            torch.testing.assert_close(c.output[b], o, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(c.output[b], captured[layer]["o"][b, last].float(), rtol=1e-4, atol=1e-5)
            img_pos = torch.nonzero((inputs["input_ids"][b] == image_id) & mask[b]).flatten()
            cos, l2 = c.influence(b)
            for n, j in enumerate(img_pos.tolist()):
                zeroed = a_last.clone()
                zeroed[:, j] = 0.0  # mask the last token's attention to j in every head, no renormalisation
                o_masked = torch.einsum("hs,hsd->hd", zeroed, v[b]).reshape(-1)
                torch.testing.assert_close(c.output[b] - c.image[b][n], o_masked, rtol=1e-4, atol=1e-5)
                assert float(cos[n]) == pytest.approx(
                    float(torch.nn.functional.cosine_similarity(o_masked, o, dim=0)), abs=1e-5
                )
                assert float(l2[n]) == pytest.approx(float((o - o_masked).norm()), rel=1e-4, abs=1e-6)
                checked += 1
    assert checked > 50


# ---------------------------------------------------------------------------------------------- shallow stage
@pytest.mark.parametrize("shallow_layers", [1, 3])
def test_shallow_edits_equal_explicit_attention_reference(family_model, batch_inputs, shallow_layers):
    """Prefill and cached decode with the shallow edits == full eager matrices edited, times V, o_proj."""
    name, model, proc = family_model
    inputs = batch_inputs(model, proc, n=3)
    method = VisiPruner(shallow_layers=shallow_layers, cosine_threshold=-1.0)
    with torch.no_grad():
        dense_tokens, dense_logits = gen(model, inputs, n=4)
        with method(model) as run:
            tokens, logits = gen(model, inputs, n=4)
    n_img = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert run.image_tokens_per_layer == [n_img] * num_layers(model)  # edits drop no token
    assert (logits - dense_logits).abs().max() > 1e-3  # the edits do change the model
    edit = shallow_edit(inputs, model.config.image_token_id, shallow_layers)
    for t in range(tokens.shape[1]):
        ref = masked_reference_logits(model, inputs, run.layer_positions, tokens[:, :t], attention_edit=edit)
        torch.testing.assert_close(logits[:, t], ref, rtol=1e-4, atol=1e-4)


def test_sink_index_is_a_config_field():
    model, proc = tiny("llama-mha")
    inputs = make_inputs(proc, [PROMPTS[0], "<image> <image> which is left ?"], [[image_for(model, 0)], [image_for(model, 1), image_for(model, 2)]])
    method = VisiPruner(shallow_layers=1, cosine_threshold=-1.0, sink_index=5)
    with torch.no_grad(), method(model) as run:
        logits = model(**inputs, use_cache=False).logits[:, -1]
    edit = shallow_edit(inputs, model.config.image_token_id, 1, sink_index=5)
    ref = masked_reference_logits(model, inputs, run.layer_positions, attention_edit=edit)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    n_first = (image_for(model, 0).size[0] // 4) ** 2
    with pytest.raises(ValueError, match="sink index"):
        with torch.no_grad(), VisiPruner(shallow_layers=1, sink_index=n_first)(model):
            model(**inputs)


# ---------------------------------------------------------------------------------------------- middle/deep
class _FakeView:
    """A LayerView stand-in with designed contributions: o = 10·e0, c_j = alpha_j·e1."""

    def __init__(self, layer, alphas: list[list[float] | None], state, record):
        self.layer = layer
        self.batch_size = len(alphas)
        self.image_counts = [len(a) if a else 0 for a in alphas]
        self.state, self.record = state, record
        self.num_layers = 12
        image = [torch.tensor([[0.0, x] for x in (a or [])]).reshape(-1, 2) for a in alphas]
        self._c = LastTokenContributions(image=image, output=torch.tensor([[10.0, 0.0]] * len(alphas)))
        self.asked = False

    def last_token_contributions(self):
        self.asked = True
        return self._c


def _stepper(method):
    state, record = {}, {}

    def step(layer, alphas):
        view = _FakeView(layer, alphas, state, record)
        return method.on_layer(layer, view), view

    return step, record


def test_stage_decisions_follow_the_thresholds():
    """cos(o - c_j, o) = 10 / sqrt(100 + alpha^2); ||c_j|| = alpha. Search from S + 1 (authors)."""
    method = VisiPruner(shallow_layers=2, cosine_threshold=0.995, l2_threshold=0.2, exit_threshold=0.999, exit_patience=2)
    step, record = _stepper(method)
    quiet = [0.05, 0.1, 0.15]  # cos >= 0.9999 for all
    for layer in (0, 1, 2):  # shallow layers and layer S itself: no decision, nothing computed
        decision, view = step(layer, [[1.5] * 4, None, [1.5] * 3])
        assert decision is None and not view.asked
    # layer 3 = S + 1: sample 0 has a token with cos < 0.995 (alpha 1.5 -> 0.9889) -> filtering layer
    decision, _ = step(3, [[0.1, 0.5, 1.5, 0.05], None, quiet])
    assert decision[0].tolist() == [1, 2] and decision[1] is None and decision[2] is None
    # kept tokens: 4 quiet (cos(0.3)=0.99955 >= 0.999), 5 impact (cos(0.6)=0.9982), 6 quiet -> 2 in total: exit at 6
    assert step(4, [[0.3, 0.2], None, quiet])[0] == [None, None, None]
    assert step(5, [[0.6, 0.1], None, quiet])[0] == [None, None, None]
    decision, _ = step(6, [[0.3, 0.2], None, [0.05, 0.1, 2.0]])
    assert decision[0].numel() == 0  # vision exit: every image token leaves
    assert decision[2].tolist() == [2]  # sample 2 filters now (alpha 2.0), keeps only that token
    assert record["visipruner"] == [
        {"image_tokens": 4, "filtering_layer": 3, "kept_tokens": 2, "exit_layer": 6},
        {"image_tokens": 0, "filtering_layer": None, "kept_tokens": None, "exit_layer": None},
        {"image_tokens": 3, "filtering_layer": 6, "kept_tokens": 1, "exit_layer": None},
    ]


def test_search_starts_after_layer_s():
    """The authors search from layer S + 1 (``layer_idx > shallow_mid_layer``): layer S never filters."""
    method = VisiPruner(shallow_layers=4, cosine_threshold=1.0, l2_threshold=0.0)
    step, record = _stepper(method)
    assert step(4, [[1.0, 2.0]])[0] is None
    assert step(5, [[1.0, 2.0]])[0][0].tolist() == [0, 1]
    assert record["visipruner"][0]["filtering_layer"] == 5


@pytest.mark.parametrize("count,exit_layer", [("total", 6), ("consecutive", 7)])
def test_exit_counter_total_is_the_authors_consecutive_is_the_papers(count, exit_layer):
    """quiet, impact, quiet, quiet: the authors' counter (never reset) exits one layer earlier."""
    method = VisiPruner(shallow_layers=2, l2_threshold=0.2, exit_patience=2, exit_count=count)
    step, record = _stepper(method)
    step(3, [[0.1, 1.5, 0.5]])  # filtering: keeps [1, 2]
    fired = None
    for layer, alphas in zip((4, 5, 6, 7, 8), ([0.3, 0.2], [0.6, 0.1], [0.3, 0.2], [0.3, 0.2], [0.3, 0.2]), strict=True):
        decision, _ = step(layer, [alphas])
        if decision and decision[0] is not None and decision[0].numel() == 0:
            fired = layer
            break
    assert fired == exit_layer
    assert record["visipruner"][0]["exit_layer"] == exit_layer


def test_keeping_every_token_never_exits_and_keeping_none_has_no_separate_exit():
    method = VisiPruner(shallow_layers=0, l2_threshold=0.05, exit_patience=1)
    step, record = _stepper(method)
    decision, _ = step(1, [[0.1, 1.5], [0.1, 1.5]])  # every token passes the L2 test
    assert decision[0].tolist() == [0, 1]
    for layer in range(2, 12):  # many quiet layers: the authors' code never applies the exit
        decision, _ = step(layer, [[0.01, 0.01], [0.01, 0.01]])
        assert decision is None or all(d is None for d in decision)
    assert record["visipruner"][0] == {"image_tokens": 2, "filtering_layer": 1, "kept_tokens": 2, "exit_layer": None}
    strict = VisiPruner(shallow_layers=0, l2_threshold=5.0)
    step, record = _stepper(strict)
    assert step(1, [[0.1, 1.5]])[0][0].numel() == 0
    assert record["visipruner"][0] == {"image_tokens": 2, "filtering_layer": 1, "kept_tokens": 0, "exit_layer": None}


def test_the_last_layer_can_decide():
    """Decisions are possible (and recorded) at the last layer, as in the authors' code."""
    model, proc = tiny("llama-mha")
    inputs = make_inputs(proc, [PROMPTS[0]], [[image_for(model, 0)]])
    last = num_layers(model) - 1
    seen = []

    class Probe(VisiPruner):
        def on_layer(self, layer, view):
            seen.append(layer)
            return super().on_layer(layer, view)

    with torch.no_grad(), Probe(shallow_layers=last - 1, shallow="off", cosine_threshold=1.0, l2_threshold=0.0)(model) as run:
        model(**inputs)
    assert seen[-1] == last
    assert run.record["visipruner"][0]["filtering_layer"] == last  # recorded, nothing left to prune


@pytest.mark.parametrize("patience", [1, 2])
def test_vision_exit_fires_after_patience(patience):
    """cosine_threshold=1 filters at layer S + 1; exit_threshold=-1 makes every later layer quiet:
    a sample that kept some but not all tokens exits at S + 1 + patience."""
    model, proc = tiny("llama-mha")
    s = 1
    inputs = make_inputs(proc, [PROMPTS[0], PROMPTS[1]], [[image_for(model, 0)], [image_for(model, 1)]])
    method = VisiPruner(shallow_layers=s, cosine_threshold=1.0, l2_threshold=_L2["llama-mha"], exit_threshold=-1.0, exit_patience=patience)
    with torch.no_grad(), method(model) as run:
        tokens, logits = gen(model, inputs, n=3)
    n = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    partial = [r for r in run.record["visipruner"] if 0 < r["kept_tokens"] < n]
    assert partial, run.record
    for b, rec in enumerate(run.record["visipruner"]):
        assert rec["filtering_layer"] == s + 1
        counts = [c[b] for c in run.image_tokens_per_layer]
        if 0 < rec["kept_tokens"] < n:
            exit_layer = s + 1 + patience
            assert rec["exit_layer"] == exit_layer
            assert counts == [n] * (s + 2) + [rec["kept_tokens"]] * (exit_layer - s - 1) + [0] * (num_layers(model) - exit_layer - 1)
    for t in range(tokens.shape[1]):
        ref = masked_reference_logits(
            model, inputs, run.layer_positions, tokens[:, :t],
            attention_edit=shallow_edit(inputs, model.config.image_token_id, s),
        )
        torch.testing.assert_close(logits[:, t], ref, rtol=1e-4, atol=1e-4)
    # no exit without patience
    with torch.no_grad(), VisiPruner(shallow_layers=s, cosine_threshold=1.0, l2_threshold=_L2["llama-mha"], exit_threshold=-1.0, exit_patience=None)(model) as run:
        model(**inputs)
    assert all(r["exit_layer"] is None for r in run.record["visipruner"])


def test_generated_tokens_attend_without_edits():
    """The authors edit the prefill only: a reference that also edits generated queries disagrees."""
    model, proc = tiny("llama-mha")
    inputs = make_inputs(proc, [PROMPTS[0], PROMPTS[2]], [[image_for(model, 0)], [image_for(model, 1)]])
    method = VisiPruner(shallow_layers=3, cosine_threshold=-1.0)
    with torch.no_grad(), method(model) as run:
        tokens, logits = gen(model, inputs, n=3)
    image_id = model.config.image_token_id
    ours = masked_reference_logits(model, inputs, run.layer_positions, tokens[:, :2], attention_edit=shallow_edit(inputs, image_id, 3))
    torch.testing.assert_close(logits[:, 2], ours, rtol=1e-4, atol=1e-4)

    def edit_all(layer, w):  # the old rule: generated tokens are edited as text queries too
        s = inputs["input_ids"].shape[1]
        longer = {**inputs, "input_ids": torch.cat([inputs["input_ids"], tokens[:, :2]], 1)}
        longer["attention_mask"] = torch.ones_like(longer["input_ids"])
        longer["attention_mask"][:, :s] = inputs["attention_mask"]
        return shallow_edit(longer, image_id, 3)(layer, w)

    every = masked_reference_logits(model, inputs, run.layer_positions, tokens[:, :2], attention_edit=edit_all)
    assert (every - logits[:, 2]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["drop_half", "off"])
def test_shallow_variants_equal_explicit_reference(variant):
    model, proc = tiny("qwen2-gqa")
    inputs = make_inputs(proc, [PROMPTS[0], PROMPTS[2]], [[image_for(model, 0)], [image_for(model, 1)]])
    method = VisiPruner(shallow_layers=2, shallow=variant, cosine_threshold=-1.0)
    with torch.no_grad(), method(model) as run:
        tokens, logits = gen(model, inputs, n=3)
    with torch.no_grad():
        dense_tokens, dense_logits = gen(model, inputs, n=3)
    if variant == "off":  # no edits, nothing filtered: the dense model
        assert method.attention_edits() == {}
        torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-5)
        return
    assert (logits - dense_logits).abs().max() > 1e-3
    edit = shallow_edit(inputs, model.config.image_token_id, 2, variant=variant)
    for t in range(tokens.shape[1]):
        ref = masked_reference_logits(model, inputs, run.layer_positions, tokens[:, :t], attention_edit=edit)
        torch.testing.assert_close(logits[:, t], ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- equivalences
def test_cached_generation_equals_masking_reference(family_model, batch_inputs):
    name, model, proc = family_model
    inputs = batch_inputs(model, proc, n=3)
    with torch.no_grad(), VisiPruner(**firing(name))(model) as run:
        tokens, logits = gen(model, inputs, n=4)
    recs = run.record["visipruner"]
    assert any(r["filtering_layer"] is not None for r in recs), recs
    assert any(0 < (r["kept_tokens"] or 0) < r["image_tokens"] for r in recs), recs
    edit = shallow_edit(inputs, model.config.image_token_id, 2)
    for t in range(tokens.shape[1]):
        ref = masked_reference_logits(model, inputs, run.layer_positions, tokens[:, :t], attention_edit=edit)
        torch.testing.assert_close(logits[:, t], ref, rtol=1e-4, atol=1e-4)
    # counts follow the record, per sample
    for b, r in enumerate(recs):
        counts = [c[b] for c in run.image_tokens_per_layer]
        f, e = r["filtering_layer"], r["exit_layer"]
        if f is not None:
            assert counts[f] == r["image_tokens"] and counts[f + 1] == r["kept_tokens"]
        if e is not None:
            assert counts[e] > 0 and all(c == 0 for c in counts[e + 1 :])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_per_sample(family_model, padding_side):
    name, model, proc = family_model
    method = VisiPruner(**firing(name))
    prompts = [PROMPTS[0], PROMPTS[1], "<image> <image> which is left ?", "how many objects are there ?"]
    images = [[image_for(model, 0)], [image_for(model, 1)], [image_for(model, 2), image_for(model, 3)], []]
    batch = make_inputs(proc, prompts, images, padding_side)
    mask = batch["attention_mask"].bool()
    with torch.no_grad(), method(model) as run:
        logits = model(**batch, position_ids=_positions(mask)).logits
    records = run.record["visipruner"]
    assert len({r["filtering_layer"] for r in records[:3]} | {r["kept_tokens"] for r in records[:3]}) > 1
    for i, (p, im) in enumerate(zip(prompts, images, strict=True)):
        single = make_inputs(proc, [p], [im] if im else None)
        with torch.no_grad(), method(model) as run1:
            single_logits = model(**single).logits
        valid = torch.nonzero(mask[i]).flatten()
        torch.testing.assert_close(logits[i, valid], single_logits[0], rtol=1e-4, atol=1e-4)
        assert records[i] == run1.record["visipruner"][0]
        assert [c[i] for c in run.image_tokens_per_layer] == [c[0] for c in run1.image_tokens_per_layer]
        offset = int(valid[0])
        for layer_b, layer_1 in zip(run.layer_positions, run1.layer_positions, strict=True):
            assert torch.equal(layer_b[i] - offset, layer_1[0])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_sdpa_equals_eager(name, batch_inputs):
    outs = []
    for attn in ("sdpa", "eager"):
        model, proc = tiny(name, attn)
        inputs = batch_inputs(model, proc, n=3)
        with torch.no_grad(), VisiPruner(**firing(name))(model) as run:
            tokens, logits = gen(model, inputs, n=3)
        outs.append((tokens, logits, run.record["visipruner"]))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)
    assert outs[0][2] == outs[1][2]


def test_hooks_removed_and_other_methods_unaffected(batch_inputs):
    model, proc = tiny("qwen2-gqa")
    before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    inputs = batch_inputs(model, proc, n=2)
    with torch.no_grad():
        a = model(**inputs).logits
        with VisiPruner(**firing("qwen2-gqa"))(model):
            model(**inputs)
        with Dense()(model):
            b = model(**inputs).logits
    assert torch.equal(a, b)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == before


def _no_cache_consistency(model, inputs, method):
    results = []
    for use_cache in (True, False):
        with torch.no_grad(), method(model):
            out = model.generate(
                **inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache,
                return_dict_in_generate=True, output_logits=True,
            )
        results.append((out.sequences, torch.stack(out.logits, 1).float()))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)


def test_edited_cache_equals_recomputing_without_cache(batch_inputs):
    """Decode steps read the edited values from the cache; re-running the prefill each step agrees."""
    model, proc = tiny("mistral-gqa")
    _no_cache_consistency(model, batch_inputs(model, proc, n=3), VisiPruner(shallow_layers=3, cosine_threshold=-1.0))


@pytest.mark.parametrize("family", ["gemma3", "qwen2-vl"])
def test_other_families_cache_consistency(family):
    """Sliding-window caches (Gemma3) and M-RoPE (Qwen2-VL) with the shallow edits."""
    testing_families = pytest.importorskip("himap_vlm.models.tiny_families")
    f = testing_families.build_tiny_family(family)
    prompts = ["user : <image> what is in the picture ? answer with one word . assistant :", "<image> describe the image"]
    inputs = f.inputs(prompts, [[0], [1]])
    _no_cache_consistency(f.model, inputs, VisiPruner(shallow_layers=3, cosine_threshold=-1.0))
