"""The information-flow analysis (``himap_vlm.apps.analysis``, ``himap analyze``) on tiny offline models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from himap_vlm.apps.analysis import (
    attention_share,
    block_flow,
    block_spec,
    flow_blocking,
    logit_lens,
    saliency,
    saliency_map,
    taylor_terms,
    token_groups,
)
from himap_vlm.apps.analysis.blocking import BlockingResult
from himap_vlm.apps.prompting import build_inputs
from himap_vlm.models.tiny import TinyLlavaSpec, build_tiny_llava, example_image

SPEC = TinyLlavaSpec(image_size=16, num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2, seed=3)
N_IMG = 16  # (16 // 4) ** 2 image tokens per image
TWO_IMAGES_Q = "user : <image> and <image> what is in the picture ? answer with one word . assistant :"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(SPEC)


def _one(seed: int = 0, question: str = "what color is the circle ?", answer: str = "red") -> dict:
    return {"image": example_image(16, seed), "question": question, "answer": answer}


def _two() -> dict:
    return {"image": [example_image(16, 1), example_image(16, 2)], "question": TWO_IMAGES_Q, "answer": "blue"}


def _layer_outputs(model, inputs) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    layers = model.model.language_model.layers
    handles = [layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).clone()))
               for layer in layers]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outs


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


# ------------------------------------------------------------------------------------------ groups


def test_groups_two_images(tiny):
    model, proc = tiny
    inputs = build_inputs(proc, [example_image(16, 1), example_image(16, 2)], TWO_IMAGES_Q)
    g = token_groups(inputs["input_ids"][0], model.config.image_token_id, inputs["attention_mask"][0])
    s = inputs["input_ids"].shape[1]
    assert g.sys.tolist() == [0, 1]  # "user :"
    assert g.img.tolist() == list(range(2, 2 + N_IMG)) + list(range(3 + N_IMG, 3 + 2 * N_IMG))
    assert g.other.tolist() == [2 + N_IMG]  # "and", between the images
    assert g.ins.tolist() == list(range(3 + 2 * N_IMG, s))
    assert sum(g.sizes.values()) == s


@pytest.mark.parametrize("side", ["left", "right"])
def test_groups_ignore_padding(tiny, side):
    model, proc = tiny
    qs = ["what ?", "what is in the picture ? answer with one word ."]
    ims = [example_image(16, 0), example_image(16, 1)]
    batch = build_inputs(proc, ims, qs, padding_side=side)
    iid = model.config.image_token_id
    for row, (q, im) in enumerate(zip(qs, ims, strict=True)):
        alone = build_inputs(proc, im, q)
        ref = token_groups(alone["input_ids"][0], iid)
        got = token_groups(batch["input_ids"][row], iid, batch["attention_mask"][row])
        pad = int((batch["attention_mask"][row] == 0).sum())
        shift = pad if side == "left" else 0
        for name in ("sys", "img", "ins", "other"):
            assert (got[name] - shift).tolist() == ref[name].tolist(), (row, name)


# ------------------------------------------------------------------------------------------ saliency


def test_saliency_matches_finite_differences():
    model, proc = build_tiny_llava(SPEC)
    model.double()
    inputs = build_inputs(proc, example_image(16, 0), "what is in the picture ?", model=model)
    g = token_groups(inputs["input_ids"][0], model.config.image_token_id)
    s, target = inputs["input_ids"].shape[1], 7
    last, img0, ins0 = s - 1, int(g.img[0]), int(g.ins[0])
    entries = [(0, 1, last, img0), (1, 3, last, int(g.sys[0])), (2, 2, ins0, int(g.img[5])),
               (3, 0, int(g.img[9]), int(g.img[4])), (1, 0, last, int(g.sys[1])), (2, 1, last, int(g.img[3]))]
    got: dict[tuple, tuple[float, float]] = {}

    def on_layer(layer, a, grad):
        assert a.shape == grad.shape == (4, s, s)
        for e in entries:
            if e[0] == layer:
                got[e] = (float(a[e[1], e[2], e[3]]), float(grad[e[1], e[2], e[3]]))

    loss = taylor_terms(model, inputs, target, on_layer)
    layers = model.model.language_model.layers

    def loss_with(eps, layer, h, i, j):  # eps added to A[h, i, j] (eps * A[h, i, j]: multiplicative)
        attn = layers[layer].self_attn
        v: dict[str, torch.Tensor] = {}
        hd, kvh = attn.head_dim, h // attn.num_key_value_groups

        def post(module, args, out):  # A[h, i, j] += eps  <=>  out[i] += o_proj_h(eps * v_j)
            o, w = out
            o = o.clone()
            o[0, i] += attn.o_proj.weight[:, h * hd:(h + 1) * hd] @ (eps * v["v"][0, j, kvh * hd:(kvh + 1) * hd])
            return o, w

        hs = [attn.v_proj.register_forward_hook(lambda m, a, o: v.__setitem__("v", o)),
              attn.register_forward_hook(post)]
        try:
            with torch.no_grad():
                logits = model(**inputs, use_cache=False).logits[0, -1]
        finally:
            for hnd in hs:
                hnd.remove()
        return float(F.cross_entropy(logits[None].double(), torch.tensor([target])))

    # Eager like the gradient pass; the norms compute in float32 even in a float64 model, so a
    # moderate eps keeps the rounding noise of the difference quotient well below the tolerance.
    model.set_attn_implementation("eager")
    assert loss == pytest.approx(loss_with(0.0, 0, 0, 0, 0), rel=1e-6)
    eps = 3e-3
    for e in entries:
        a, grad = got[e]
        fd = (loss_with(eps, *e) - loss_with(-eps, *e)) / (2 * eps)
        # paper (eq. 1): A * dL/dA
        assert a * grad == pytest.approx(a * fd, rel=1e-2, abs=1e-6 * max(a, 1e-3)), (e, a, grad, fd)
        # authors: the gradient of a ones tensor M multiplying A is dL/dM = A * dL/dA (M -> 1 +- delta moves
        # A by +-delta * A; delta = eps / A keeps the step in A at eps), and their saliency multiplies it by
        # A once more: A^2 * dL/dA
        delta = eps / a
        fd_m = (loss_with(delta * a, *e) - loss_with(-delta * a, *e)) / (2 * delta)
        assert a * a * grad == pytest.approx(a * fd_m, rel=1e-2, abs=1e-6 * max(a * a, 1e-6)), (e, a, grad, fd_m)
        h, i, j = e[1:]
        a_full = torch.zeros(4, s, s, dtype=torch.float64)
        g_full = torch.zeros(4, s, s, dtype=torch.float64)
        a_full[h, i, j], g_full[h, i, j] = a, grad
        assert float(saliency_map(a_full, g_full, "paper")[i, j]) == pytest.approx(abs(a * grad) / 4, rel=1e-12)
        assert float(saliency_map(a_full, g_full, "authors")[i, j]) == pytest.approx(abs(a * a * grad) / 4,
                                                                                      rel=1e-12)
    # the last layer's image queries cannot reach the last position: exactly zero
    assert got[entries[3]][1] == 0.0
    assert sum(abs(a * gr) > 1e-5 for a, gr in got.values()) >= 3


@pytest.mark.parametrize("convention", ["authors", "paper"])
def test_saliency_group_metrics_two_images_and_isolation(tiny, convention):
    model, proc = tiny
    res = saliency(model, proc, [_two(), _one()], convention=convention)
    assert res.per_sample["img"].shape == (2, SPEC.num_layers)
    assert res.group_sizes["other"].tolist() == [1, 0]
    # Reference: the full maps of sample 0, reduced by explicit index lists.
    inputs = build_inputs(proc, _two()["image"], TWO_IMAGES_Q, model=model)
    s = inputs["input_ids"].shape[1]
    sys_, img = [0, 1], list(range(2, 2 + N_IMG)) + list(range(3 + N_IMG, 3 + 2 * N_IMG))
    ins = list(range(3 + 2 * N_IMG, s))
    maps: dict[int, torch.Tensor] = {}
    tid = proc.tokenizer("blue", add_special_tokens=False)["input_ids"][0]
    loss = taylor_terms(model, inputs, tid,
                        lambda layer, a, g: maps.__setitem__(layer, saliency_map(a, g, convention)))
    assert res.loss[0] == pytest.approx(loss, rel=1e-5)
    for layer, sal in maps.items():
        for name, idx in (("sys", sys_), ("img", img), ("ins", ins)):
            assert res.per_sample[name][0, layer] == pytest.approx(float(sal[idx].sum()) / len(idx), rel=1e-4)
            assert res.per_sample[f"{name}_from"][0, layer] == pytest.approx(
                float(sal[:, idx].sum()) / len(idx), rel=1e-4)
        assert res.per_sample["s_vv"][0, layer] == pytest.approx(float(sal[img][:, img].sum()), rel=1e-4)
        assert res.per_sample["s_vt"][0, layer] == pytest.approx(float(sal[ins][:, img].sum()), rel=1e-4)
        assert res.blocks[0, layer, 0, 2] == pytest.approx(float(sal[sys_][:, ins].sum()), abs=1e-12)  # causal: 0
        assert res.per_sample["total"][0, layer] == pytest.approx(float(sal.sum()), rel=1e-4)
    # One sample at a time: a sample's numbers do not depend on the others in the list.
    alone = saliency(model, proc, [_one()], convention=convention)
    for k, v in alone.per_sample.items():
        np.testing.assert_allclose(v[0], res.per_sample[k][1], rtol=1e-5, atol=1e-10)
    assert res.per_layer["s_vt"].shape == res.per_layer_std["s_vt"].shape == (SPEC.num_layers,)
    assert res.block_share.shape == (SPEC.num_layers, 3, 3)


# ------------------------------------------------------------------------------------------ blocking


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_blocking_img2txt_changes_only_later_layers(tiny, attn):
    model, proc = tiny
    model.set_attn_implementation(attn)
    try:
        inputs = build_inputs(proc, example_image(16, 0), "what is in the picture ?", model=model)
        g = token_groups(inputs["input_ids"][0], model.config.image_token_id)
        base = _layer_outputs(model, inputs)
        blocked_layer = 1
        with block_flow(model, g, "img2txt", blocked_layer):
            after = _layer_outputs(model, inputs)
        for k in range(blocked_layer):
            assert torch.equal(base[k], after[k]), k
        first_ins = int(g.ins[0])
        diff = (base[blocked_layer] - after[blocked_layer]).abs()[0].amax(-1)  # (S,)
        assert torch.all(diff[:first_ins] < 1e-6)  # only instruction rows change at the blocked layer
        assert torch.all(diff[first_ins:] > 1e-5)
        for k in range(blocked_layer + 1, SPEC.num_layers):
            assert (base[k] - after[k]).abs().max() > 1e-5, k
        with block_flow(model, g, "none", range(SPEC.num_layers)):
            same = _layer_outputs(model, inputs)
        for a, b in zip(base, same, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    finally:
        model.set_attn_implementation("sdpa")


def test_blocking_masks_logits_exactly_prefill_and_decode(tiny):
    model, proc = tiny
    inputs = build_inputs(proc, example_image(16, 0), "what is in the picture ?", model=model)
    g = token_groups(inputs["input_ids"][0], model.config.image_token_id)
    s = inputs["input_ids"].shape[1]
    model.set_attn_implementation("eager")
    weights: list[torch.Tensor] = []
    attn = model.model.language_model.layers[2].self_attn
    h = attn.register_forward_hook(lambda m, a, o: weights.append(o[1].detach()))
    try:
        with torch.no_grad(), block_flow(model, g, "img2txt", 2):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with torch.no_grad(), block_flow(model, g, "img2img", 2):
            model(**inputs, use_cache=False)
    finally:
        h.remove()
        model.set_attn_implementation("sdpa")
    prefill, decode, img2img = weights[0], weights[1:3], weights[3]
    img, ins = torch.as_tensor(g.img), torch.as_tensor(g.ins)
    assert prefill.shape[-1] == s
    assert torch.all(prefill[0][:, ins][:, :, img] == 0)
    assert prefill[0][:, img][:, :, img].sum() > 0  # other flows untouched
    torch.testing.assert_close(prefill.sum(-1), torch.ones_like(prefill.sum(-1)))
    for k, w in enumerate(decode):  # generated tokens are after the last image: blocked too
        assert w.shape[-2:] == (1, s + k + 1)
        assert torch.all(w[0, :, 0, img] == 0) and w[0, :, 0, int(g.sys[0])].sum() > 0
    tri = img2img[0][:, img][:, :, img]
    assert torch.all(tri == 0) and img2img[0][:, ins][:, :, img].sum() > 0


def test_img2rnd_rows():
    ids = torch.tensor([1, 2] + [9] * 10 + [3, 4, 5, 6])
    g = token_groups(ids, 9)
    a = block_spec(g, "img2rnd", np.random.default_rng(5), convention="paper")
    b = block_spec(g, "img2rnd", np.random.default_rng(5), convention="paper")
    assert a.rows.tolist() == b.rows.tolist() and len(a.rows) == len(g.ins) == 4
    assert set(a.rows.tolist()) <= set(range(2, 16)) and a.cols.tolist() == list(range(2, 12))
    assert a.rows_at(20).tolist() == a.rows.tolist() and not a.needs_full_recompute
    # authors: T - |sys| - |img| rows among positions >= |sys|, a new seeded draw per sequence length T
    c = block_spec(g, "img2rnd", np.random.default_rng(5), convention="authors")
    d = block_spec(g, "img2rnd", np.random.default_rng(5), convention="authors")
    assert c.needs_full_recompute and c.rows_at(16).tolist() == d.rows_at(16).tolist()
    assert c.rows_at(16) is c.rows_at(16)  # one draw per forward pass, shared by its layers
    for t in (16, 17, 18):
        rows = c.rows_at(t)
        assert len(rows) == t - 2 - 10 and set(rows.tolist()) <= set(range(2, t))
    with pytest.raises(ValueError, match="no token before the first image"):
        block_spec(token_groups(torch.tensor([9, 9, 3]), 9), "img2img")
    with pytest.raises(ValueError, match="unknown flow"):
        block_spec(g, "txt2img")


@pytest.mark.parametrize("convention", ["authors", "paper"])
def test_consistency_is_one_when_nothing_is_blocked(tiny, convention):
    model, proc = tiny
    first = flow_blocking(model, proc, [_one(0)], layers=[0], flows=("none",), max_new_tokens=3,
                          convention=convention).dense_predictions[0]
    # sample 0's answer is its own undisturbed output (so the authors' subset is not empty)
    res = flow_blocking(model, proc, [_one(0, answer=first.strip()), _one(1, answer="yes")], layers=[0, 3],
                        flows=("none",), max_new_tokens=3, convention=convention)
    np.testing.assert_array_equal(res.score_consistency["none"], 1.0)
    np.testing.assert_array_equal(res.output_unchanged["none"], 1.0)
    np.testing.assert_array_equal(res.label_consistency["none"], 1.0)
    np.testing.assert_array_equal(res.answer_retained["none"], 1.0)
    np.testing.assert_array_equal(res.score_consistency_dense, 1.0)
    np.testing.assert_array_equal(res.prediction_bias["none"], 0.0)
    assert res.bias_ratio() is None
    assert json.dumps(res.to_dict())


@pytest.mark.parametrize("convention", ["authors", "paper"])
def test_batched_runs_match_single_runs(tiny, convention):
    model, proc = tiny
    kw = dict(layers=[1, 2], flows=("img2txt", "img2img", "img2rnd"), max_new_tokens=2, seed=4,
              convention=convention)
    batched = flow_blocking(model, proc, [_two()], **kw)  # up to 7 rows, each with its own mask
    single = flow_blocking(model, proc, [_two()], batch_size=1, **kw)
    for f in kw["flows"]:
        for metric in ("score_consistency", "output_unchanged", "answer_found"):
            np.testing.assert_array_equal(getattr(batched, metric)[f], getattr(single, metric)[f])
        assert batched.predictions[f] == single.predictions[f]
    assert batched.score_consistency["img2img"].min() < 1.0  # blocking does something


def test_bias_ratio_arithmetic():
    sc = {"img2img": np.array([[0.9, 0.5], [0.7, 0.5]]), "img2txt": np.array([[0.5, 0.9], [0.5, 0.9]])}
    res = BlockingResult(
        layers=[0, 1], windows=[(0, 1), (1, 2)], flows=("img2img", "img2txt"), num_layers=2, score_consistency=sc,
        output_unchanged={f: np.ones((2, 2)) for f in sc}, answer_found={f: np.zeros((2, 2)) for f in sc},
        score_consistency_dense=np.ones(2), dense_answer_found=np.array([True, False]),
        dense_predictions=["a", "b"], convention="paper",
    )
    np.testing.assert_allclose(res.prediction_bias["img2img"], [0.2, 0.5])
    np.testing.assert_allclose(res.bias_ratio(), np.log([0.2 / 0.5, 0.5 / 0.1]))
    np.testing.assert_allclose(res.answer_retained["img2txt"], [0.0, 0.0])
    assert res.accuracy_dense == 0.5


# ------------------------------------------------------------------------------------------ attention share / lens


def test_attention_share_and_logit_lens(tiny):
    model, proc = tiny
    samples = [_two(), _one()]
    att = attention_share(model, proc, samples)
    total = sum(att.share[g] for g in ("sys", "img", "ins", "other"))
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
    assert (att.share["other"][0] > 0).all() and (att.share["other"][1] == 0).all()
    lens = logit_lens(model, proc, samples)
    assert lens.per_sample["answer_rank"].shape == (2, SPEC.num_layers)
    for n, rec in enumerate(samples):  # the last layer's lens is the model's own prediction
        imgs = rec["image"]
        inputs = build_inputs(proc, imgs, rec["question"], model=model)
        with torch.no_grad():
            probs = model(**inputs).logits[0, -1].float().softmax(-1)
        tid = proc.tokenizer(rec["answer"], add_special_tokens=False)["input_ids"][0]
        assert lens.per_sample["answer_prob"][n, -1] == pytest.approx(float(probs[tid]), rel=1e-4)
        assert lens.top1_ids[n, -1] == int(probs.argmax())
        assert lens.per_sample["answer_rank"][n, -1] == int((probs > probs[tid]).sum())
    assert lens.per_sample["matches_final"][:, -1].tolist() == [1.0, 1.0]
    assert json.dumps(att.to_dict()) and json.dumps(lens.to_dict())


def test_model_is_restored():
    model, proc = build_tiny_llava(SPEC)
    samples = [_one()]
    with torch.no_grad():  # transformers installs its own output-capturing hooks on the first call
        model(**build_inputs(proc, samples[0]["image"], samples[0]["question"], model=model))
    flags = [p.requires_grad for p in model.parameters()]
    hooks = _hook_count(model)
    saliency(model, proc, samples)
    flow_blocking(model, proc, samples, layers=[1], flows=("img2txt",), max_new_tokens=2)
    attention_share(model, proc, samples)
    logit_lens(model, proc, samples)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert _hook_count(model) == hooks
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    with pytest.raises(ValueError, match="no samples"):
        saliency(model, proc, [])
    assert model.config.text_config._attn_implementation == "sdpa" and _hook_count(model) == hooks


# ------------------------------------------------------------------------------------------ CLI


def test_cli_analyze_smoke(tmp_path):
    from himap_vlm.apps.cli import _load_commands, app
    from himap_vlm.apps.data.synthetic import SceneQAConfig, load_synthetic, write_jsonl
    from himap_vlm.models.tiny import save_tiny_llava

    _load_commands()
    model_dir = save_tiny_llava(tmp_path / "model", TinyLlavaSpec(image_size=16, num_layers=4, hidden_size=32))
    data = write_jsonl(load_synthetic("test", 6, SceneQAConfig(image_size=16, grid=2)), tmp_path / "data")
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["analyze", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                              "--n", "2", "--layers", "1,-1", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    index = json.loads((out / "analysis.json").read_text())
    assert index["n_samples"] == 2 and index["measurements"] == ["saliency", "blocking", "attention", "logit-lens"]
    sal = json.loads((out / "saliency.json").read_text())
    assert len(sal["per_layer"]["img"]) == 4 and len(sal["block_share"]) == 4
    blk = json.loads((out / "blocking.json").read_text())
    assert blk["layers"] == [1, 3] and set(blk["score_consistency"]) == {"img2txt", "img2img", "img2rnd"}
    assert len(json.loads((out / "attention_share.json").read_text())["per_layer"]["img"]) == 4
    assert len(json.loads((out / "logit_lens.json").read_text())["per_layer"]["answer_rank"]) == 4
    for name in index["figures"]:
        assert (out / name).stat().st_size > 1000
    assert {"saliency_groups.png", "saliency_flows.png", "saliency_blocks.png", "blocking_consistency.png",
            "bias_ratio.png", "attention_share.png", "logit_lens.png"} <= set(index["figures"])
    bad = runner.invoke(app, ["analyze", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                              "--what", "saliency,nope"])
    assert bad.exit_code == 2 and "unknown measurement" in bad.output
