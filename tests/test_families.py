"""Engine equivalence tests on a tiny offline model of every supported family beyond LLaVA-1.5.

Each family (see :mod:`himap_vlm.models.tiny_families`) is checked for: pruning nothing equals dense;
KV-cache generation on shortened layers equals a full-length eager run that masks the dropped
tokens instead (the reference below, generalised through the family records: decoder layers,
the model's own positions — 3-D M-RoPE for Qwen-VL — and per-layer-type masks with image blocks
and sliding windows for Gemma3); a padded batch equals its samples run alone; SDPA equals eager;
scores equal a ranking from explicit attention maps.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from himap_vlm import VTW, Dense, FastV, HiMAP, RandomPrune  # noqa: E402
from himap_vlm.core import contract
from himap_vlm.core.families import layer_type, resolve_family, supported_classes  # noqa: E402
from himap_vlm.core.methods.base import kept_count  # noqa: E402
from himap_vlm.models.tiny_families import FAMILY_BUILDERS, TinyFamily, build_tiny_family, word_id  # noqa: E402

FAMILIES = sorted(FAMILY_BUILDERS)

PROMPTS = [
    "user : <image> what is in the picture ? answer with one word . assistant :",
    "<image> describe the image",
    "system : you are helpful . user : how many objects ? <image> count them . assistant :",
]
MULTI = "user : <image> and <image> which is left ? assistant :"
TEXT_ONLY = "how many objects are there ?"

_CACHE: dict[tuple[str, str], TinyFamily] = {}


def tiny_family(name: str, attn: str = "sdpa") -> TinyFamily:
    """A cached tiny model of family ``name``."""
    if (name, attn) not in _CACHE:
        _CACHE[(name, attn)] = build_tiny_family(name, attn)
    return _CACHE[(name, attn)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster, and steadier on a loaded machine, than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def fam(request) -> TinyFamily:
    return tiny_family(request.param)


def first_layer(f: TinyFamily) -> int:
    return resolve_family(f.model).min_prune_layer(f.model.config)


METHOD_FACTORIES = {
    "himap": lambda f: HiMAP(k1=max(2, first_layer(f)), r1=0.5, k2=f.num_layers - 2, r2=0.75),
    "fastv-last": lambda f: FastV(k=max(2, first_layer(f)), r=0.5),
    "fastv-mean": lambda f: FastV(k=max(3, first_layer(f)), r=0.7, criterion="mean_received"),
    "random": lambda f: RandomPrune(k=first_layer(f), r=0.6, seed=3),
    "vtw": lambda f: VTW(k=f.num_layers - 2),
}


def gen(model, inputs, n: int = 3):
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1).float()


def n_image(f: TinyFamily, inputs) -> list[int]:
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    return ((ids == f.image_token_id) & mask).sum(1).tolist()


# ---------------------------------------------------------------------------------------------- reference
def _block_ids(is_image: torch.Tensor) -> torch.Tensor:
    prev = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    groups = torch.cumsum((is_image & ~prev).long(), 1) - 1
    return torch.where(is_image, groups, -1)


def base_allowed(f: TinyFamily, full: dict) -> dict[str, torch.Tensor]:
    """Per layer type, the (B, T, T) keys each query may attend in the unpruned model, from first principles.

    Causal; image blocks bidirectional where the family says so (from ``token_type_ids``);
    sliding windows on sequence indices (``q - k < window``), applied after the blocks (Gemma3);
    padding keys never.
    """
    ids, mask = full["input_ids"], full["attention_mask"].bool()
    b, t = ids.shape
    idx = torch.arange(t)
    allowed = (idx[None, :] <= idx[:, None])[None].expand(b, t, t)
    blocks = None
    if resolve_family(f.model).bidirectional_image_blocks and "token_type_ids" in full:
        blocks = _block_ids((full["token_type_ids"] == 1) & mask)
        allowed = allowed | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
    out = {}
    for kind in {layer_type(f.text_config, i) for i in range(f.num_layers)}:
        a = allowed
        if kind == "sliding_attention":
            window = ((idx[:, None] - idx[None, :]) < int(f.text_config.sliding_window))[None]
            if blocks is not None and contract.image_blocks_override_window():  # transformers < 5.13
                window = window | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
            a = a & window
        out[kind] = a & mask[:, None, :]
    return out


@torch.no_grad()
def masked_reference_logits(f: TinyFamily, inputs: dict, layer_positions, generated: torch.Tensor | None = None):
    """Last-position logits of a full-length eager run where each layer masks the tokens it dropped.

    Every layer keeps every token; layer ``l`` may only attend (as keys) to the prompt tokens in
    ``layer_positions[l]`` plus every generated token. Positions are the model's own for the
    full sequence (``TinyFamily.position_ids``: M-RoPE from ``get_rope_index`` for Qwen-VL).
    ``layer_positions=None`` keeps everything (the unpruned model).
    """
    model = f.model
    generated = generated if generated is not None else inputs["input_ids"][:, :0]
    full = f.extend_inputs(inputs, generated)
    b, total = full["input_ids"].shape
    s = inputs["input_ids"].shape[1]
    base = base_allowed(f, full)
    dtype = next(model.parameters()).dtype
    handles = []
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for li, layer in enumerate(getattr(f.decoder, resolve_family(model).layers_attr)):
            keys = torch.ones(b, total, dtype=torch.bool)
            if layer_positions is not None:
                keys[:, :s] = False
                for i, pos in enumerate(layer_positions[li]):
                    keys[i, pos] = True
            keep = base[layer_type(f.text_config, li)] & keys[:, None, :]
            eye = torch.eye(total, dtype=torch.bool)[None]
            keep = keep | (eye & ~keep.any(-1, keepdim=True))  # fully masked rows stay finite
            float_mask = torch.zeros(b, 1, total, total, dtype=dtype)
            float_mask.masked_fill_(~keep[:, None], torch.finfo(dtype).min)

            def hook(module, args, kwargs, _m=float_mask):
                kwargs["attention_mask"] = _m
                return args, kwargs

            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        out = model(**full, position_ids=f.position_ids(full), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)
    return out.logits[:, -1].float()


# ---------------------------------------------------------------------------------------------- tests
def test_every_family_class_is_supported():
    for name in FAMILIES:
        f = tiny_family(name)
        assert type(f.model).__name__ in supported_classes()


def test_unsupported_model_names_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="does not support LlamaForCausalLM") as err:
        FastV(k=1, r=0.5)(model)
    for cls in ("Qwen2VLForConditionalGeneration", "Gemma3ForConditionalGeneration", "Idefics3ForConditionalGeneration",
                "LlavaNextForConditionalGeneration", "InternVLForConditionalGeneration"):
        assert cls in str(err.value)


def test_reference_equals_dense(fam):
    """The generic masking reference with nothing masked reproduces the model (masks, positions)."""
    inputs = fam.inputs([PROMPTS[0], MULTI], [[0], [1, 2]])
    with torch.no_grad():
        dense = fam.model(**inputs, position_ids=fam.position_ids(inputs)).logits[:, -1].float()
    torch.testing.assert_close(masked_reference_logits(fam, inputs, None), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method_name", ["himap", "fastv", "random", "dense"])
def test_prune_nothing_equals_dense(fam, method_name):
    first = first_layer(fam)
    method = {
        "himap": HiMAP(k1=first, r1=0.0, k2=first + 2, r2=0.0),
        "fastv": FastV(k=max(2, first), r=0.0),
        "random": RandomPrune(k=first, r=0.0),
        "dense": Dense(),
    }[method_name]
    inputs = fam.inputs([PROMPTS[0], MULTI, PROMPTS[2]], [[0], [1, 2], [3]])
    with torch.no_grad():
        dense_logits = fam.model(**inputs).logits
        dense_tokens, dense_scores = gen(fam.model, inputs)
        with method(fam.model) as run:
            logits = fam.model(**inputs).logits
            tokens, scores = gen(fam.model, inputs)
    torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(scores, dense_scores, rtol=0, atol=1e-6)
    assert torch.equal(tokens, dense_tokens)
    assert run.image_tokens_per_layer == [n_image(fam, inputs)] * fam.num_layers


@pytest.mark.parametrize("method_name", ["himap", "fastv-mean", "random"])
def test_kept_counts_over_all_images(fam, method_name):
    """Budgets apply to all image tokens of a sample (every span); text tokens are never dropped."""
    method = METHOD_FACTORIES[method_name](fam)
    inputs = fam.inputs([MULTI, PROMPTS[0]], [[1, 2], [0]])
    with torch.no_grad(), method(fam.model) as run:
        fam.model(**inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for b, total in enumerate(n_image(fam, inputs)):
        assert [c[b] for c in run.image_tokens_per_layer] == method.image_tokens_schedule(total, fam.num_layers)
        text = set(torch.nonzero((ids[b] != fam.image_token_id) & mask[b]).flatten().tolist())
        prev = None
        for layer in run.layer_positions:
            pos = set(layer[b].tolist())
            assert text <= pos and (prev is None or pos <= prev)
            prev = pos


@pytest.mark.parametrize("method_name", sorted(METHOD_FACTORIES))
def test_cached_generation_equals_masking_reference(fam, method_name):
    """KV-cache generation on physically shortened layers == full-length eager run with masked keys."""
    method = METHOD_FACTORIES[method_name](fam)
    inputs = fam.inputs([PROMPTS[2], MULTI], [[0], [1, 2]])
    with torch.no_grad(), method(fam.model) as run:
        tokens, logits = gen(fam.model, inputs, n=3)
    assert any(c != run.image_tokens_per_layer[0] for c in run.image_tokens_per_layer)  # something was pruned
    for t in range(tokens.shape[1]):
        ref = masked_reference_logits(fam, inputs, run.layer_positions, tokens[:, :t])
        torch.testing.assert_close(logits[:, t], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method_name", ["himap", "fastv-mean"])
def test_padded_batch_equals_per_sample(fam, method_name, padding_side):
    method = METHOD_FACTORIES[method_name](fam)
    prompts = [PROMPTS[0], PROMPTS[1], MULTI, TEXT_ONLY]
    images = [[0], [1], [2, 3], []]
    batch = fam.inputs(prompts, images, padding_side)
    mask = batch["attention_mask"].bool()
    with torch.no_grad(), method(fam.model) as run:
        logits = fam.model(**batch, position_ids=fam.position_ids(batch)).logits
    for i, (p, im) in enumerate(zip(prompts, images, strict=True)):
        single = fam.inputs([p], [im])
        with torch.no_grad(), method(fam.model) as run1:
            single_logits = fam.model(**single).logits
        valid = torch.nonzero(mask[i]).flatten()
        torch.testing.assert_close(logits[i, valid], single_logits[0], rtol=1e-4, atol=1e-4)
        assert [c[i] for c in run.image_tokens_per_layer] == [c[0] for c in run1.image_tokens_per_layer]
        offset = int(valid[0])
        for layer_b, layer_1 in zip(run.layer_positions, run1.layer_positions, strict=True):
            assert torch.equal(layer_b[i] - offset, layer_1[0])


def test_left_padded_generation_equals_per_sample(fam):
    method = METHOD_FACTORIES["himap"](fam)
    prompts, images = [PROMPTS[2], MULTI], [[0], [1, 2]]
    batch = fam.inputs(prompts, images)
    with torch.no_grad(), method(fam.model):
        tokens, logits = gen(fam.model, batch, n=4)
    for i in range(2):
        single = fam.inputs([prompts[i]], [images[i]])
        with torch.no_grad(), method(fam.model):
            t1, l1 = gen(fam.model, single, n=4)
        assert torch.equal(tokens[i], t1[0])
        torch.testing.assert_close(logits[i], l1[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method_name", ["himap", "random"])
def test_sdpa_equals_eager(fam, method_name):
    eager = tiny_family(fam.name, "eager")
    method = METHOD_FACTORIES[method_name](fam)
    inputs = fam.inputs([PROMPTS[0], MULTI], [[0], [1, 2]])
    outs = []
    for f in (fam, eager):
        with torch.no_grad(), method(f.model) as run:
            tokens, logits = gen(f.model, inputs, n=3)
        outs.append((tokens, logits, run.layer_positions))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)
    for la, lb in zip(outs[0][2], outs[1][2], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(la, lb, strict=True))


@pytest.mark.parametrize(
    "method,queries,reduce",
    [
        (FastV(k=2, r=0.5, criterion="mean_received"), "all", "mean"),
        (HiMAP(k1=2, r1=0.5, k2=4, r2=0.5), "instruction", "sum"),
        (HiMAP(k1=2, r1=0.5, k2=4, r2=0.5, swap_criteria=True), "image", "sum"),
    ],
    ids=["fastv-mean", "himap-shallow", "himap-swapped-shallow"],
)
@pytest.mark.parametrize("name", ["gemma3", "qwen2-vl", "llava-next", "qwen3-vl", "llava-mistral-swa"])
def test_scores_match_explicit_attention_maps(name, method, queries, reduce):
    """Kept tokens == ranking from the model's own eager attention maps (Gemma3: blocks + windows)."""
    f = tiny_family(name)
    inputs = f.inputs([PROMPTS[2], MULTI], [[0], [1, 2]])
    pos = f.position_ids(inputs)
    previous = f.model.config._attn_implementation
    f.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            maps = f.model(**inputs, position_ids=pos, output_attentions=True).attentions
    finally:
        f.model.set_attn_implementation(previous)
    with torch.no_grad(), method(f.model) as run:
        f.model(**inputs, position_ids=pos)
    k = method.steps()[0].layer
    allowed = base_allowed(f, inputs)[layer_type(f.text_config, k - 1)]
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    img_id = f.image_token_id
    for b in range(ids.shape[0]):
        a = maps[k - 1][b].float().mean(0)  # (S, S)
        img = (ids[b] == img_id) & mask[b]
        p = torch.arange(ids.shape[1])
        if queries == "instruction":
            rows = (p > int(p[img].max())) & mask[b]
        elif queries == "image":
            rows = img
        else:
            rows = mask[b].clone()
        scores = a[rows][:, img].sum(0)
        if reduce == "mean":
            scores = scores / allowed[b][rows][:, img].sum(0).float().clamp(min=1)
        n_keep = run.image_tokens_per_layer[k][b]
        assert n_keep == kept_count(int(img.sum()), 0.5)
        order = torch.sort(scores, descending=True, stable=True).indices[:n_keep]
        expected = torch.sort(p[img][order]).values
        got = run.layer_positions[k][b]
        assert torch.equal(got[ids[b][got] == img_id], expected)


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_qwen_decode_positions_follow_rope_deltas(name):
    """Manual continuation without position ids: the model derives M-RoPE decode positions from its
    ``rope_deltas`` and layer 0's cache length, which pruning never shortens."""
    from transformers import DynamicCache

    f = tiny_family(name)
    method = METHOD_FACTORIES["fastv-last"](f)
    inputs = f.inputs([PROMPTS[0]], [[3]])
    cache = DynamicCache(config=f.text_config)
    nxt = torch.tensor([[word_id("yes")]])
    with torch.no_grad(), method(f.model) as run:
        f.model(**inputs, **contract.cache_call_kwargs(f.model, cache), use_cache=True)
        lengths = [cache.layers[i].keys.shape[-2] for i in range(f.num_layers)]
        step = f.model(input_ids=nxt, **contract.cache_call_kwargs(f.model, cache), use_cache=True).logits[:, -1].float()
    assert lengths[-1] < lengths[0] == inputs["input_ids"].shape[1]
    ref = masked_reference_logits(f, inputs, run.layer_positions, nxt)
    torch.testing.assert_close(step, ref, rtol=1e-4, atol=1e-4)


def test_qwen3_vl_refuses_pruning_before_deepstack():
    f = tiny_family("qwen3-vl")
    n = len(f.model.config.vision_config.deepstack_visual_indexes)
    assert first_layer(f) == n == 2
    for method in (FastV(k=1, r=0.5), HiMAP(k1=1, r1=0.5, k2=3, r2=0.5), RandomPrune(k=1, r=0.5), VTW(k=1)):
        with pytest.raises(ValueError, match="DeepStack"):
            method(f.model)
    run = FastV(k=n, r=0.5)(f.model)  # allowed from the first layer after the injections
    assert not run.active


def test_dynamic_method_runs_on_every_family(fam):
    """VisiPruner (per-layer, per-sample decisions and attention edits) generates on every family."""
    from himap_vlm import VisiPruner

    method = VisiPruner(
        shallow_layers=max(2, first_layer(fam)), cosine_threshold=0.9999, l2_threshold=0.0, exit_threshold=0.99999
    )
    inputs = fam.inputs([MULTI, PROMPTS[1]], [[1, 2], [0]])
    with torch.no_grad(), method(fam.model) as run:
        tokens, logits = gen(fam.model, inputs, n=3)
    assert tokens.shape == (2, 3) and torch.isfinite(logits).all()
    ids = inputs["input_ids"]
    for b, total in enumerate(n_image(fam, inputs)):
        counts = [c[b] for c in run.image_tokens_per_layer]
        assert counts[0] == total and all(x >= y for x, y in zip(counts, counts[1:], strict=False))
        text = set(torch.nonzero((ids[b] != fam.image_token_id) & inputs["attention_mask"][b].bool()).flatten().tolist())
        assert all(text <= set(layer[b].tolist()) for layer in run.layer_positions)
