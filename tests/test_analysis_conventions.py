"""The two conventions of the flow analysis (``convention="authors"`` vs ``"paper"``), item by item.

Every test here checks each convention against its own definition on a tiny offline model, with
inputs where the two definitions give different numbers, so each fails if the switch were
ignored. Items (issue 18): 1 saliency power, 2 blocking window, 3 target token, 4 label
consistency, 5 random rows / generated tokens / figure scaling.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from himap_vlm.apps.analysis import block_spec, flow_blocking, get_convention, saliency, token_groups
from himap_vlm.apps.analysis._common import answer_in_output, normalise_answer
from himap_vlm.apps.analysis.blocking_result import BlockingResult
from himap_vlm.apps.analysis.conventions import bare_piece_token, check_targets, first_answer_token
from himap_vlm.apps.analysis.plots import joint_minmax, plot_visual_flows, saliency_curves
from himap_vlm.apps.analysis.plots_compare import save_comparison_figures
from himap_vlm.apps.prompting import build_inputs
from himap_vlm.models.tiny import TinyLlavaSpec, build_tiny_llava, example_image

SPEC = TinyLlavaSpec(image_size=16, num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2, seed=3)
L = SPEC.num_layers
QUESTION = "what color is the circle ?"


def _rec(seed: int = 0, answer: str = "red", question: str = QUESTION) -> dict:
    return {"image": example_image(16, seed), "question": question, "answer": answer}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(SPEC)


@pytest.fixture(scope="module")
def tiny_eager():
    return build_tiny_llava(SPEC, attn_implementation="eager")


# ------------------------------------------------------------------------------------------ item 1: saliency


def _ones_adapter_reference(model, inputs, target: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The authors' AttnAdapter mechanism, re-implemented: softmax map times a ones tensor that
    requires grad (``src/HiMAP/analysis/atten_adapter.py``). Returns per layer (A, ones.grad), (H, S, S)."""
    from transformers import AttentionInterface

    store: list[tuple[torch.Tensor, torch.Tensor]] = []

    def ones_adapter(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        logits = (query @ key.transpose(2, 3)) * scaling
        s = logits.shape[-1]
        if attention_mask is None:  # no padding: plain causal
            attention_mask = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
        m = attention_mask[..., :s]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m
        a = torch.softmax(logits, dim=-1)
        ones = torch.ones_like(a, requires_grad=True)
        store.append((a.detach(), ones))
        weights = a * ones
        return (weights @ value).transpose(1, 2).contiguous(), weights

    AttentionInterface.register("ones_adapter_test", ones_adapter)
    lm = model.model.language_model
    previous = lm.config._attn_implementation
    lm.set_attn_implementation("ones_adapter_test")
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        logits = model(**inputs, use_cache=False).logits[0, -1]
        F.cross_entropy(logits[None].double(), torch.tensor([target])).backward()
    finally:
        lm.set_attn_implementation(previous)
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    return [(a[0], ones.grad[0]) for a, ones in store]


def test_item1_saliency_power_against_the_ones_tensor_reference():
    """authors = mean_h |ones.grad · A| = mean_h |A²·∂L/∂A|; paper = mean_h |ones.grad| = mean_h |A·∂L/∂A| (float64)."""
    model, proc = build_tiny_llava(SPEC)
    model.double()
    rec = _rec(0, answer="red")
    inputs = build_inputs(proc, rec["image"], rec["question"], model=model)
    g = token_groups(inputs["input_ids"][0], model.config.image_token_id)
    target = proc.tokenizer.convert_tokens_to_ids("red")
    ref = _ones_adapter_reference(model, inputs, target)
    assert len(ref) == L
    res = {c: saliency(model, proc, [rec], convention=c) for c in ("authors", "paper")}
    idx = {"sys": g.sys, "img": g.img, "ins": g.ins}
    for layer, (a, ones_grad) in enumerate(ref):
        a, ones_grad = a.double().numpy(), ones_grad.double().numpy()
        maps = {"authors": np.abs(ones_grad * a).mean(0), "paper": np.abs(ones_grad).mean(0)}
        for conv, sal in maps.items():
            got = res[conv].per_sample
            for name, rows in idx.items():
                assert got[name][0, layer] == pytest.approx(sal[rows].sum() / len(rows), rel=1e-6, abs=1e-300)
            assert got["s_vv"][0, layer] == pytest.approx(sal[np.ix_(g.img, g.img)].sum(), rel=1e-6, abs=1e-300)
            assert got["s_vt"][0, layer] == pytest.approx(sal[np.ix_(g.ins, g.img)].sum(), rel=1e-6, abs=1e-300)
            assert got["total"][0, layer] == pytest.approx(sal.sum(), rel=1e-6)
    # the two conventions really differ here (otherwise this test could not tell them apart)
    ratio = res["paper"].per_sample["ins"] / res["authors"].per_sample["ins"]
    assert np.all(ratio > 1.5)
    assert res["authors"].to_dict()["convention"] == "authors" and res["paper"].convention == "paper"
    assert "A_l[h,i,j]^2" in res["authors"].definitions["I_l[i,j]"]


# ------------------------------------------------------------------------------------------ item 2: window


def _capture_prefill_weights(model):
    """Forward hooks that keep the attention weights of batch-of-2 calls (the blocked chunk's prefill)."""
    layers = model.model.language_model.layers
    got: dict[int, torch.Tensor] = {}

    def make(k):
        def hook(module, args, out):
            w = out[1]
            if w is not None and w.shape[0] == 2 and w.shape[-2] == w.shape[-1] and k not in got:
                got[k] = w.detach().clone()

        return hook

    return got, [layer.self_attn.register_forward_hook(make(k)) for k, layer in enumerate(layers)]


@pytest.mark.parametrize("convention, blocked", [("authors", [1, 2, 3]), ("paper", [1])])
def test_item2_blocking_window(tiny_eager, convention, blocked):
    model, proc = tiny_eager
    rec = _rec(0)
    inputs = build_inputs(proc, rec["image"], rec["question"], model=model)
    img = torch.as_tensor(token_groups(inputs["input_ids"][0], model.config.image_token_id).img)
    got, handles = _capture_prefill_weights(model)
    try:
        res = flow_blocking(model, proc, [rec], layers=[1], flows=("img2img",), convention=convention,
                            max_new_tokens=1)
    finally:
        for h in handles:
            h.remove()
    assert res.windows == [(1, L if convention == "authors" else 2)]
    assert sorted(got) == list(range(L))  # rows: 0 = control (nothing blocked), 1 = img2img from layer 1
    for layer, w in got.items():
        img_img = w[:, :, img][:, :, :, img]  # (2, H, |img|, |img|)
        assert img_img[0].sum() > 0, layer
        if layer in blocked:
            assert torch.all(img_img[1] == 0), layer
        else:
            assert img_img[1].sum() > 0, layer


# ------------------------------------------------------------------------------------------ item 3: target


def _sentencepiece_like(model, proc):
    """A word-level tokenizer that writes words as ``▁word`` (as SentencePiece does after a space) and
    also has the bare pieces ``red`` and ``A`` — the LLaMA situation of ``A`` (29909) vs ``▁A`` (319)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    old = proc.tokenizer
    special = set(old.all_special_tokens)
    vocab = {w if (w in special or not w.isalnum()) else "▁" + w: i for w, i in old.get_vocab().items()}
    vocab.update({"red": len(vocab), "A": len(vocab) + 1})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert fast.convert_tokens_to_ids("<image>") == model.config.image_token_id
    model.resize_token_embeddings(len(fast), mean_resizing=False)
    return LlavaProcessor(image_processor=proc.image_processor, tokenizer=fast, patch_size=SPEC.patch_size,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def test_item3_target_token():
    model, proc = build_tiny_llava(SPEC)
    proc = _sentencepiece_like(model, proc)
    tok = proc.tokenizer
    bare, spaced = tok.convert_tokens_to_ids("red"), tok.convert_tokens_to_ids("▁red")
    assert bare != spaced and first_answer_token(proc, "red") == spaced and bare_piece_token(proc, "red") == bare
    recs = [_rec(0, "red"), _rec(1, "A")]
    a = saliency(model, proc, recs, convention="authors")
    p = saliency(model, proc, recs, convention="paper")
    assert a.target_ids == [bare, tok.convert_tokens_to_ids("A")] and a.target_tokens == ["red", "A"]
    assert p.target_ids == [spaced, first_answer_token(proc, "A")] and p.target_tokens[0] == "▁red"
    assert not np.allclose(a.loss, p.loss)  # a different token is differentiated
    # An answer that is no single vocabulary piece: the authors' rule has no token -> loud, before any run.
    with pytest.raises(ValueError, match=r"sample 1 \('red circle'\).*not a single piece.*convention='paper'"):
        saliency(model, proc, [_rec(0, "red"), _rec(1, "red circle")], convention="authors")
    with pytest.raises(ValueError, match="not a single piece"):
        check_targets(proc, ["blue sky"], "authors")
    assert check_targets(proc, ["red circle"], "paper") == [spaced]  # ours: first id of the tokenization
    assert saliency(model, proc, [_rec(0, "red circle")], convention="paper").target_ids == [spaced]


# ------------------------------------------------------------------------------------------ item 4: label metric


def test_item4_answer_rules():
    assert answer_in_output("Answer: B", "A", None, "substring")  # the authors' raw substring test
    assert not answer_in_output("Answer: B", "A", None, "whole_word")
    assert answer_in_output(" red circle", "red", None, "substring")
    assert not answer_in_output("a red circle", "Red", None, "substring")  # case-sensitive
    assert answer_in_output("a red circle", "Red", None, "whole_word")
    with pytest.raises(ValueError, match="unknown answer rule"):
        answer_in_output("x", "x", None, "fuzzy")


def _result(convention: str) -> BlockingResult:
    n, f = 3, "img2txt"
    return BlockingResult(
        layers=[0, 1], windows=[(0, 2), (1, 2)], flows=(f,), num_layers=2, convention=convention,
        score_consistency={f: np.array([[0.2, 1.0], [0.4, 1.0], [1.0, 0.6]])},
        output_unchanged={f: np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])},
        answer_found={f: np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])},
        score_consistency_dense=np.ones(n), dense_answer_found=np.array([True, True, False]),
        dense_predictions=["a", "b", "c"],
    )


def test_item4_label_metric_and_samples_used():
    a, p = _result("authors"), _result("paper")
    assert a.label_metric == "answer_retained" and p.label_metric == "output_unchanged"
    # authors: means over the undisturbed-correct samples 0 and 1 only
    assert a.samples_used.tolist() == [True, True, False] and a.n_used == 2
    np.testing.assert_allclose(a.label_consistency["img2txt"], [0.5, 1.0])
    np.testing.assert_allclose(a.mean("score_consistency")["img2txt"], [0.3, 1.0])
    np.testing.assert_allclose(a.prediction_bias["img2txt"], [0.7, 0.0])
    # paper: label consistency = output unchanged, over all samples
    assert p.n_used == 3
    np.testing.assert_allclose(p.label_consistency["img2txt"], [2 / 3, 2 / 3])
    np.testing.assert_allclose(p.mean("score_consistency")["img2txt"], [1.6 / 3, 2.6 / 3])
    for r in (a, p):  # answer_retained always over the undisturbed-correct samples; accuracy over all
        np.testing.assert_allclose(r.answer_retained["img2txt"], [0.5, 1.0])
        np.testing.assert_allclose(r.accuracy["img2txt"], [2 / 3, 1.0])
    d = a.to_dict()
    assert d["convention"] == "authors" and d["label_metric"] == "answer_retained" and d["n_used"] == 2
    assert "label_consistency" not in d and {"answer_retained", "output_unchanged"} <= set(d)
    empty = _result("authors")
    empty.dense_answer_found[:] = False
    assert np.isnan(empty.label_consistency["img2txt"]).all() and json.dumps(empty.to_dict())


def test_item4_end_to_end(tiny):
    model, proc = tiny
    probe = flow_blocking(model, proc, [_rec(0)], layers=[0], flows=("img2txt",), convention="paper")
    dense = probe.dense_predictions[0]
    word = dense.split()[0]
    # sample 0: the answer is the undisturbed output's first word upper-cased -> found by the whole-word
    # rule (normalised) but not by the authors' case-sensitive substring; sample 1: its exact first word.
    recs = [_rec(0, answer=word.upper() if word.upper() != word else word.lower()), _rec(0, answer=word)]
    res = {c: flow_blocking(model, proc, recs, layers=[0, 2], flows=("img2txt", "img2img"), convention=c)
           for c in ("authors", "paper")}
    assert res["authors"].dense_answer_found.tolist() == [False, True]
    assert res["paper"].dense_answer_found.tolist() == [True, True]
    assert res["authors"].n_used == 1 and res["paper"].n_used == 2
    for c, r in res.items():
        rule = get_convention(c).answer_rule
        for f in r.flows:
            for s, rec in enumerate(recs):
                for j in range(len(r.layers)):
                    text = r.predictions[f][s][j]
                    assert r.answer_found[f][s, j] == answer_in_output(text, rec["answer"], None, rule)
                    assert r.output_unchanged[f][s, j] == (normalise_answer(text) ==
                                                           normalise_answer(r.dense_predictions[s]))
    a = res["authors"]
    np.testing.assert_array_equal(a.label_consistency["img2txt"], a.answer_found["img2txt"][1])


# ------------------------------------------------------------------------------------------ item 5


def _blocked_rows(w: torch.Tensor, img: torch.Tensor, first_img: int) -> list[list[int]]:
    """Per batch row: query positions (from the first image on) with zero weight on every image key."""
    dead = (w[:, :, :, img].abs().sum(dim=(1, 3)) == 0)  # (B, q)
    offset = w.shape[-1] - w.shape[-2]
    return [[offset + q for q in torch.nonzero(row).flatten().tolist() if offset + q >= first_img] for row in dead]


@pytest.mark.parametrize("convention", ["authors", "paper"])
def test_item5_random_rows(tiny_eager, convention):
    model, proc = tiny_eager
    rec = _rec(1)
    inputs = build_inputs(proc, rec["image"], rec["question"], model=model)
    g = token_groups(inputs["input_ids"][0], model.config.image_token_id)
    s, img = inputs["input_ids"].shape[1], torch.as_tensor(g.img)
    calls: list[torch.Tensor] = []
    attn = model.model.language_model.layers[L - 1].self_attn
    h = attn.register_forward_hook(lambda m, a, o: calls.append(o[1].detach().clone()))
    try:
        flow_blocking(model, proc, [rec], layers=[L - 1], flows=("img2rnd",), convention=convention,
                      max_new_tokens=3)
    finally:
        h.remove()
    calls = calls[3:]  # the first three calls are the undisturbed generation (prefill + 2 decode steps)
    if convention == "authors":
        # the control row runs cached (prefill + 2 decode steps), then the img2rnd row: 3 full passes
        assert [tuple(w.shape[-2:]) for w in calls[:3]] == [(s, s), (1, s + 1), (1, s + 2)]
        rnd = calls[3:]
        assert [tuple(w.shape[-2:]) for w in rnd] == [(s, s), (s + 1, s + 1), (s + 2, s + 2)]
        draws = [_blocked_rows(w, img, int(g.img[0]))[0] for w in rnd]
        for t, rows in enumerate(draws):
            assert len(rows) == len(g.ins) + t  # T - |sys| - |img| rows, generated tokens included
            assert set(rows) <= set(g.outside_sys.tolist()) | set(range(s, s + t))
        assert any(not set(draws[t]) <= set(draws[t + 1]) for t in range(2))  # redrawn, not extended
    else:
        prefill = [w for w in calls if w.shape[0] == 2 and w.shape[-2] == s]
        assert len(prefill) == 1
        rows = _blocked_rows(prefill[0], img, int(g.img[0]))
        assert rows[0] == [] and len(rows[1]) == len(g.ins)
        assert sorted(rows[1]) == block_spec(g, "img2rnd", np.random.default_rng([0, 0, L - 1]),
                                             convention="paper").rows.tolist()
        decode = [w for w in calls if w.shape[-2] == 1]
        assert decode and all(_blocked_rows(w, img, int(g.img[0])) == [[], []] for w in decode)


@pytest.mark.parametrize("convention, tokens", [("authors", 8), ("paper", 5)])
def test_item5_generated_tokens(tiny, convention, tokens, monkeypatch):
    model, proc = tiny
    seen: list[tuple[int, bool]] = []
    original = model.generate

    def spy(*args, **kwargs):
        seen.append((kwargs["max_new_tokens"], kwargs["use_cache"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    res = flow_blocking(model, proc, [_rec(0)], layers=[2], flows=("img2txt", "img2rnd"), convention=convention)
    assert res.max_new_tokens == tokens and res.overrides == {}
    assert {n for n, _ in seen} == {tokens}
    # the authors' per-pass redraw of img2rnd needs full-recompute generation, nothing else does
    assert sorted(uc for _, uc in seen) == ([False, True, True] if convention == "authors" else [True, True])
    assert len(proc.tokenizer(res.dense_predictions[0])["input_ids"]) == tokens  # no EOS on the tiny model
    over = flow_blocking(model, proc, [_rec(0)], layers=[2], flows=("img2txt",), convention=convention,
                         span=2, max_new_tokens=3)
    assert over.overrides == {"span": 2, "max_new_tokens": 3} and over.windows == [(2, 4)]


def test_item5_figure_scaling(tiny, tmp_path):
    model, proc = tiny
    recs = [_rec(0), _rec(1)]
    res = {c: saliency(model, proc, recs, convention=c) for c in ("authors", "paper")}
    keys = ("s_vv", "s_vt")
    a, p = saliency_curves(res["authors"], keys), saliency_curves(res["paper"], keys)
    raw = {k: res["authors"].per_layer[k] for k in keys}
    vals = np.concatenate([v[np.isfinite(v)] for v in raw.values()])
    lo, hi = vals.min(), vals.max()
    for k in keys:  # authors: one min and one max over both curves (plot_props.py)
        np.testing.assert_allclose(a[k][0], (raw[k] - lo) / (hi - lo))
        np.testing.assert_allclose(a[k][1], res["authors"].per_layer_std[k] / (hi - lo))
        np.testing.assert_allclose(p[k][0], res["paper"].per_layer[k])  # paper: raw
    scaled = np.concatenate([a[k][0] for k in keys])
    assert np.nanmin(scaled) == 0.0 and np.nanmax(scaled) == pytest.approx(1.0)
    assert joint_minmax({"x": np.array([2.0, 2.0])})[0]["x"].tolist() == [0.0, 0.0]  # zero range: no division
    for c, r in res.items():  # the PNG says which convention produced it
        path = plot_visual_flows(r, tmp_path / f"{c}.png")
        assert f"convention: {c}" in Image.open(path).text["Description"]
    blk = {c: flow_blocking(model, proc, recs, layers=[1, 3], convention=c, max_new_tokens=2)
           for c in ("authors", "paper")}
    paths = save_comparison_figures(res, blk, tmp_path / "cmp")
    assert {q.name for q in paths} == {"compare_saliency_groups.png", "compare_saliency_flows.png",
                                      "compare_saliency_blocks_layers.png", "compare_blocking_consistency.png",
                                      "compare_bias_ratio.png"}
    with pytest.raises(ValueError, match="missing"):
        save_comparison_figures({"authors": res["authors"]}, None, tmp_path)
    with pytest.raises(ValueError, match="computed with convention"):
        save_comparison_figures({"authors": res["paper"], "paper": res["paper"]}, None, tmp_path)


# ------------------------------------------------------------------------------------------ API / CLI


def test_unknown_convention_is_refused(tiny):
    model, proc = tiny
    for call in (lambda: saliency(model, proc, [_rec()], convention="code"),
                 lambda: flow_blocking(model, proc, [_rec()], convention="code")):
        with pytest.raises(ValueError, match="unknown convention 'code'.*'authors'.*'paper'"):
            call()


def test_cli_convention_both(tmp_path):
    from himap_vlm.apps.cli import _load_commands, app
    from himap_vlm.apps.data.synthetic import SceneQAConfig, load_synthetic, write_jsonl
    from himap_vlm.models.tiny import save_tiny_llava

    _load_commands()
    model_dir = save_tiny_llava(tmp_path / "model", TinyLlavaSpec(image_size=16, num_layers=4, hidden_size=32))
    data = write_jsonl(load_synthetic("test", 4, SceneQAConfig(image_size=16, grid=2)), tmp_path / "data")
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["analyze", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--n", "2",
            "--layers", "1", "--what", "saliency,blocking,attention", "--convention", "both"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    index = json.loads((out / "analysis.json").read_text())
    assert index["convention"] == "both"
    assert index["files"]["saliency"] == {"authors": "authors/saliency.json", "paper": "paper/saliency.json"}
    assert index["files"]["attention"] == "attention_share.json"
    for c in ("authors", "paper"):
        sal = json.loads((out / c / "saliency.json").read_text())
        blk = json.loads((out / c / "blocking.json").read_text())
        assert sal["convention"] == blk["convention"] == c
        assert blk["max_new_tokens"] == get_convention(c).max_new_tokens
        assert blk["windows"] == [[1, 4] if c == "authors" else [1, 2]]
        assert f"convention: {c}" in Image.open(out / c / "saliency_flows.png").text["Description"]
    assert {"compare_saliency_groups.png", "compare_blocking_consistency.png", "compare_bias_ratio.png",
            "attention_share.png", "authors/saliency_groups.png", "paper/bias_ratio.png"} <= set(index["figures"])
    bad = runner.invoke(app, args[:-1] + ["nope"])
    assert bad.exit_code == 2 and "unknown convention" in bad.output
