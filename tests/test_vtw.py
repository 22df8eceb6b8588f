"""VTW on the shared engine (tiny offline LLaVA models, CPU): semantics, equivalences, calibration, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from conftest import PROMPTS, SPECS, image_for, make_inputs, tiny
from himap_vlm import VTW, get_method
from himap_vlm.apps.calibrate import calibrate_vtw, choose_layer, first_token_kl, vtw_kl_curve
from himap_vlm.apps.prompting import build_inputs, build_prompt
from himap_vlm.core import contract
from himap_vlm.models.tiny import TinyLlavaSpec, build_tiny_llava
from reference import _positions, masked_reference_logits


def num_layers(model) -> int:
    return model.config.text_config.num_hidden_layers


def gen(model, inputs, n=4):
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1).float()


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad", [0, -1, 2.0, "3", True, None])
def test_k_is_validated(bad):
    with pytest.raises(ValueError, match="k"):
        VTW(k=bad)


def test_k_must_be_below_num_layers():
    model, _ = tiny("llama-mha")
    with pytest.raises(ValueError, match=r"k=6 is out of range.*\[1, 5\]"):
        VTW(k=num_layers(model))(model)
    assert get_method("vtw") is VTW and VTW(k=3).k == 3


def test_schedule_is_static():
    assert VTW(k=16).image_tokens_schedule(576, 32) == [576] * 16 + [0] * 16


# ---------------------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("name", sorted(SPECS))
def test_no_image_token_or_image_kv_after_k(name, batch_inputs):
    model, proc = tiny(name)
    inputs = batch_inputs(model, proc, n=3)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    n_img = ((ids == model.config.image_token_id) & mask).sum(1)
    k = num_layers(model) // 2
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad(), VTW(k=k)(model) as run:
        out = model(**inputs, **contract.cache_call_kwargs(model, cache), use_cache=True)
    assert out.logits.shape[:2] == ids.shape and torch.isfinite(out.logits).all()
    counts = run.image_tokens_per_layer
    assert counts[:k] == [n_img.tolist()] * k
    assert counts[k:] == [[0] * ids.shape[0]] * (num_layers(model) - k)
    s = ids.shape[1]
    lengths = [cache.layers[i].keys.shape[-2] for i in range(num_layers(model))]
    assert lengths[:k] == [s] * k
    # deeper layers: the longest row without its image tokens (other rows are left-filled)
    width = int((mask.sum(1) - n_img).max())
    assert lengths[k:] == [width] * (num_layers(model) - k)
    for layer in run.layer_positions[k:]:
        for b, pos in enumerate(layer):
            assert not (ids[b, pos] == model.config.image_token_id).any()
            assert len(pos) == int(mask[b].sum() - n_img[b])


def test_text_only_equals_dense():
    model, proc = tiny("qwen2-gqa")
    inputs = make_inputs(proc, ["how many objects are there ?", "what is this ?"], None)
    with torch.no_grad():
        dense_tokens, dense_logits = gen(model, inputs)
        with VTW(k=2)(model):
            tokens, logits = gen(model, inputs)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_cached_generation_equals_masking_reference(family_model, batch_inputs, where):
    name, model, proc = family_model
    n_layers = num_layers(model)
    k = {"first": 1, "middle": n_layers // 2, "last": n_layers - 1}[where]
    inputs = batch_inputs(model, proc, n=2)
    with torch.no_grad(), VTW(k=k)(model) as run:
        tokens, logits = gen(model, inputs, n=4)
    for t in range(tokens.shape[1]):
        ref = masked_reference_logits(model, inputs, run.layer_positions, tokens[:, :t])
        torch.testing.assert_close(logits[:, t], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_per_sample(family_model, padding_side):
    name, model, proc = family_model
    method = VTW(k=2)
    prompts = [PROMPTS[0], PROMPTS[1], "<image> <image> which is left ?", "how many objects are there ?"]
    images = [[image_for(model, 0)], [image_for(model, 1)], [image_for(model, 2), image_for(model, 3)], []]
    batch = make_inputs(proc, prompts, images, padding_side)
    mask = batch["attention_mask"].bool()
    with torch.no_grad(), method(model) as run:
        logits = model(**batch, position_ids=_positions(mask)).logits
    for i, (p, im) in enumerate(zip(prompts, images, strict=True)):
        single = make_inputs(proc, [p], [im] if im else None)
        with torch.no_grad(), method(model) as run1:
            single_logits = model(**single).logits
        valid = torch.nonzero(mask[i]).flatten()
        torch.testing.assert_close(logits[i, valid], single_logits[0], rtol=1e-4, atol=1e-4)
        assert [c[i] for c in run.image_tokens_per_layer] == [c[0] for c in run1.image_tokens_per_layer]


def test_left_padded_generation_equals_per_sample():
    model, proc = tiny("mistral-gqa")
    prompts = [PROMPTS[2], "<image> <image> which is left ?"]
    images = [[image_for(model, 0)], [image_for(model, 1), image_for(model, 2)]]
    batch = make_inputs(proc, prompts, images)
    with torch.no_grad(), VTW(k=3)(model):
        tokens, logits = gen(model, batch, n=4)
    for i in range(2):
        single = make_inputs(proc, [prompts[i]], [images[i]])
        with torch.no_grad(), VTW(k=3)(model):
            t1, l1 = gen(model, single, n=4)
        assert torch.equal(tokens[i], t1[0])
        torch.testing.assert_close(logits[i], l1[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama-mha", "qwen2-gqa"])
def test_sdpa_equals_eager(name, batch_inputs):
    outs = []
    for attn in ("sdpa", "eager"):
        model, proc = tiny(name, attn)
        inputs = batch_inputs(model, proc, n=3)
        with torch.no_grad(), VTW(k=2)(model):
            outs.append(gen(model, inputs, n=3))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- calibration
def test_choose_layer_is_first_under_eta():
    cands = [5, 6, 7, 8, 9]
    assert choose_layer(cands, [0.5, 0.01, 0.002, 0.004, 0.0001], 0.003) == 7  # first, not best / last
    assert choose_layer(cands, [0.5, 0.01, 0.003, 0.0, 0.0], 0.003) == 7  # <= eta
    assert choose_layer(cands, [0.5] * 5, 0.003) is None


def test_first_token_kl_direction():
    dense = torch.tensor([[2.0, 0.0, -1.0]])
    withdrawn = torch.tensor([[0.0, 1.0, 0.5]])
    p, q = torch.softmax(withdrawn.double(), -1), torch.softmax(dense.double(), -1)
    expected = (p * (p.log() - q.log())).sum(-1)  # KL(P_withdrawn || P_dense)
    torch.testing.assert_close(first_token_kl(withdrawn, dense), expected)
    # the authors' formulation: KLDivLoss(log_softmax(dense), softmax(withdrawn))
    ref = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(dense.double(), -1), p)
    torch.testing.assert_close(first_token_kl(withdrawn, dense)[0], ref)
    assert float(first_token_kl(dense, dense)) == 0.0


def _records(model, n=3):
    questions = ["what is in the picture ?", "how many objects are there ?", "which color is the square ?"]
    return [{"image": image_for(model, i), "question": questions[i % 3]} for i in range(n)]


def test_calibration_picks_first_layer_of_a_known_curve():
    """Layers >= d0 get a zero attention output projection, so from d0 on nothing a token attends
    to (images included) reaches the residual stream: withdrawing at any d >= d0 leaves the first
    output token unchanged (KL = 0), while withdrawing earlier changes it (KL > 0)."""
    model, proc = build_tiny_llava(TinyLlavaSpec(num_layers=6, seed=5))
    d0 = 3
    with torch.no_grad():
        for layer in model.model.language_model.layers[d0:]:
            layer.self_attn.o_proj.weight.zero_()
    result = calibrate_vtw(model, proc, _records(model), eta=1e-9, start=1)
    assert result.candidates == [1, 2, 3, 4, 5]
    assert all(v > 1e-6 for v in result.kl[: d0 - 1])
    assert all(v <= 1e-9 for v in result.kl[d0 - 1 :])
    assert result.layer == d0
    # a looser eta picks an earlier layer when the curve allows it, a stricter one none
    loose = choose_layer(result.candidates, result.kl, max(result.kl[:2]))
    assert loose in (1, 2)
    assert calibrate_vtw(model, proc, _records(model, 1), eta=1e-9, start=1).layer == d0


def test_calibration_costs_one_forward_per_candidate_per_sample():
    model, proc = tiny("llama-mha")
    decoder = model.model.language_model
    calls = []
    handle = decoder.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        records = _records(model, 3)
        seen = []
        result = calibrate_vtw(model, proc, records, start=2, progress=lambda d, t: seen.append((d, t)))
        n_cand = num_layers(model) - 2
        assert result.candidates == list(range(2, num_layers(model)))
        assert len(calls) == result.forwards == 3 * (n_cand + 1)
        assert seen[-1] == (len(calls), len(calls))
        calls.clear()
        batched = calibrate_vtw(model, proc, records, start=2, batch_size=3)
        assert len(calls) == batched.forwards == n_cand + 1
    finally:
        handle.remove()
    assert batched.layer == result.layer
    torch.testing.assert_close(torch.tensor(batched.per_sample), torch.tensor(result.per_sample), rtol=1e-3, atol=1e-7)
    # the curve is the per-candidate mean over samples
    torch.testing.assert_close(torch.tensor(result.kl, dtype=torch.float64), torch.tensor(result.per_sample, dtype=torch.float64).mean(0))


def test_calibration_kl_matches_direct_computation():
    model, proc = tiny("mistral-gqa")
    rec = _records(model, 1)[0]
    inputs = build_inputs(proc, rec["image"], rec["question"], model=model)
    with torch.no_grad():
        dense = model(**inputs).logits[:, -1]
        with VTW(k=2)(model):
            withdrawn = model(**inputs).logits[:, -1]
    per_sample, forwards = vtw_kl_curve(model, [inputs], [2, 3])
    assert forwards == 3
    assert per_sample[0][0] == pytest.approx(float(first_token_kl(withdrawn, dense)[0]), rel=1e-6, abs=1e-12)


def test_calibration_validates_arguments():
    model, proc = tiny("llama-mha")
    recs = _records(model, 1)
    with pytest.raises(ValueError, match=r"stop=9 is out of range.*\[1, 5\]"):
        calibrate_vtw(model, proc, recs, start=1, stop=9)
    with pytest.raises(ValueError, match=r"start=0 is out of range"):
        calibrate_vtw(model, proc, recs, start=0)
    with pytest.raises(ValueError, match="must not exceed"):
        calibrate_vtw(model, proc, recs, start=4, stop=3)
    with pytest.raises(ValueError, match="eta"):
        calibrate_vtw(model, proc, recs, eta=float("nan"), start=1)
    with pytest.raises(ValueError, match="at least one sample"):
        calibrate_vtw(model, proc, [], start=1)
    with pytest.raises(ValueError, match="'image' and 'question'"):
        calibrate_vtw(model, proc, [{"question": "x"}], start=1)


def test_prompt_format():
    _, proc = tiny("llama-mha")
    assert build_prompt(proc, "what is this ?") == "USER: <image>\nwhat is this ? ASSISTANT:"
    assert build_prompt(proc, "<image> as written") == "<image> as written"
    assert build_prompt(proc, "q", num_images=2) == "USER: <image>\n<image>\nq ASSISTANT:"


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_calibrate_vtw(tmp_path):
    from typer.testing import CliRunner

    from himap_vlm.apps.cli import _load_commands, app
    from himap_vlm.apps.data.synthetic import SceneQAConfig, load_synthetic, write_jsonl
    from himap_vlm.models.tiny import save_tiny_llava

    model_dir = save_tiny_llava(tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 24
    data = write_jsonl(load_synthetic("validation", 4, SceneQAConfig(image_size=24)), tmp_path / "data")
    _load_commands()
    runner = CliRunner()
    args = ["calibrate", "vtw", "--model", str(model_dir), "--data", str(data), "--start", "2", "--limit", "3"]
    res = runner.invoke(app, [*args, "--json", "--eta", "0.003"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["candidates"] == [2, 3, 4, 5] and len(out["kl"]) == 4 and out["num_samples"] == 3
    assert out["forwards"] == 3 * 5
    assert out["layer"] == choose_layer(out["candidates"], out["kl"], 0.003)
    res = runner.invoke(app, [*args, "--eta", "1e-30"])
    assert res.exit_code == 0, res.output
    assert "No candidate layer" in res.stdout and "mean KL" in res.stdout
    res = runner.invoke(app, [*args[:-4], "--start", "7"])
    assert res.exit_code == 2 and "start=7 is out of range" in res.output
    res = runner.invoke(app, ["calibrate", "vtw", "--model", str(model_dir), "--data", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "not found" in res.output
