"""The lmms-eval model ``himap``: generate_until on lmms-eval style requests (tiny model, offline).

lmms-eval itself is optional: the wrapper is driven with minimal stand-ins for its ``Instance``
unless lmms-eval is installed, in which case the real classes are checked too.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _runner_helpers import single_thread, tiny_eval_env

from himap_vlm.apps.eval import get_task
from himap_vlm.apps.integrations import lmms_eval as plugin
from himap_vlm.apps.integrations.lmms_eval import HimapEvalModel, _stop_at
from himap_vlm.apps.prompting import build_prompt
from himap_vlm.core.methods.spec import MethodSpecError

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
TASK, SPLIT = "synth_mini", "test"


@dataclass
class FakeInstance:
    """What the wrapper reads of lmms-eval's ``Instance``: ``args``."""

    request_type: str
    arguments: tuple
    idx: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def args(self) -> tuple:
        return self.arguments


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_eval_env(tmp_path_factory)


@pytest.fixture(scope="module")
def docs(env):
    samples = get_task("synthetic").load(env.data_dir, limit=5)
    return [{"question": s.question, "image": s.load_image(), "answer": s.answer} for s in samples]


def _requests(docs, gen_kwargs: dict | list[dict], context=lambda d: d["question"]):
    kwargs = gen_kwargs if isinstance(gen_kwargs, list) else [gen_kwargs] * len(docs)
    return [
        FakeInstance("generate_until", (context(d), dict(kw), lambda doc: [doc["image"]], i, TASK, SPLIT))
        for i, (d, kw) in enumerate(zip(docs, kwargs, strict=True))
    ]


def _wrapper(env, docs, **kwargs) -> HimapEvalModel:
    lm = HimapEvalModel(model=env.model, processor=env.processor, device="cpu", **kwargs)
    lm.task_dict = {TASK: {SPLIT: docs}}
    return lm


def test_imports_without_lmms_eval_and_plugin_metadata():
    assert plugin.MODEL_ID == "himap" and plugin.CLASS_PATH == "himap_vlm.apps.integrations.lmms_eval.HimapLMMS"
    legacy = importlib.import_module("himap_vlm.apps.integrations.models")
    assert legacy.AVAILABLE_MODELS == {"himap": "HimapLMMS"}
    if not HAS_LMMS:
        with pytest.raises(ImportError, match="pip install 'himap\\[lmms\\]'"):
            plugin.HimapLMMS  # noqa: B018 - lazy attribute


def test_generate_until_matches_direct_generation_and_records_counts(env, docs):
    lm = _wrapper(env, docs, method="himap", k1=1, r1=0.5, k2=2, r2=0.5, batch_size=2)
    assert lm.spec.label == "himap(k1=1,r1=0.5,k2=2,r2=0.5)" and lm.is_simple
    answers = lm.generate_until(_requests(docs, {"max_new_tokens": 3, "until": ["\n\n"], "temperature": 0}))
    assert len(answers) == len(docs) and all(isinstance(a, str) for a in answers)
    assert lm.image_tokens_per_layer == [[16, 8, 4, 4]] * len(docs)
    assert 0 < lm.flops_ratio() < 1 and lm.flops_ratio("paper") < lm.flops_ratio()
    # request order is kept whatever the batching; one request alone gives the same answer as
    # generating it directly with the method active
    doc = docs[3]
    inputs = env.processor(
        images=[doc["image"]], text=build_prompt(env.processor, doc["question"], 1), return_tensors="pt"
    )
    from himap_vlm.core.methods import HiMAP

    with torch.no_grad(), HiMAP(k1=1, r1=0.5, k2=2, r2=0.5)(env.model):
        out = env.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    direct = env.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    single = _wrapper(env, docs, method="himap", k1=1, r1=0.5, k2=2, r2=0.5)
    assert single.generate_until([_requests(docs, {"max_new_tokens": 3})[3]]) == [direct.strip()]
    assert answers[3] == direct.strip()


def test_generation_groups_placeholders_and_stop_strings(env, docs):
    lm = _wrapper(env, docs, method="dense", batch_size=4)
    kwargs = [
        {"max_new_tokens": 1},
        {"max_new_tokens": 4},
        {"max_new_tokens": 1},
        {"max_new_tokens": 4},
        {"max_new_tokens": 4, "until": "six"},
    ]
    answers = lm.generate_until(_requests(docs, kwargs, context=lambda d: "<image>\n" + d["question"]))
    assert all(len(a.split()) <= kw["max_new_tokens"] for a, kw in zip(answers, kwargs, strict=True))
    assert "six" not in answers[4]
    # an image placeholder written by the task is replaced by the processor's own prompt format
    assert lm._prompt("<image>\nwhat color ?", 1) == build_prompt(env.processor, "what color ?", 1)
    assert _stop_at("a b\n\nc", ["\n\n", "x"]) == "a b" and _stop_at("abc", []) == "abc"


def test_construction_errors_and_arg_string(env, docs):
    with pytest.raises(MethodSpecError, match="does not take 'k9'"):
        _wrapper(env, docs, method="himap", k9=1)
    with pytest.raises(MethodSpecError, match="unknown method 'nope'"):
        _wrapper(env, docs, method="nope")
    with pytest.raises(ValueError, match="out of range for this model"):
        _wrapper(env, docs, method="fastv", k=9)
    lm = HimapEvalModel.create_from_arg_string(
        f"pretrained={env.model_dir},method=fastv,k=1,r=0.5,dtype=float32",
        {"batch_size": 2, "max_batch_size": None, "device": "cpu"},
    )
    assert lm.spec.label == "fastv(k=1,r=0.5)" and lm.batch_size == 2 and lm.world_size == 1
    lm.task_dict = {TASK: {SPLIT: docs}}
    with pytest.raises(NotImplementedError, match="generate_until only"):
        lm.loglikelihood([])
    with pytest.raises(ValueError, match="images only"):
        lm.generate_until(
            [FakeInstance("generate_until", ("q", {}, lambda d: ["video.mp4"], 0, TASK, SPLIT))]
        )


@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval not installed")
def test_with_real_lmms_eval(env, docs):  # pragma: no cover - optional dependency
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelManifest

    assert isinstance(plugin.manifest(), ModelManifest)
    cls = plugin.HimapLMMS
    assert issubclass(cls, lmms) and cls.is_simple
    lm = cls(model=env.model, processor=env.processor, device="cpu", method="fastv", k=1, r=0.5)
    lm.task_dict = {TASK: {SPLIT: docs}}
    requests = [
        Instance(
            "generate_until",
            (d["question"], {"max_new_tokens": 2}, lambda doc: [doc["image"]], i, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]
    assert len(lm.generate_until(requests)) == len(docs)


def test_method_read_by_the_spec_syntax_with_the_model_depth(env, docs):
    """Parameters left out take defaults_for(L) of the loaded model (L=4 here), as himap eval reads them."""
    lm = _wrapper(env, docs, method="himap")
    assert lm.spec.config == {"k1": 2, "r1": 0.5, "k2": 3, "r2": 0.75, "swap_criteria": False}
    lm = _wrapper(env, docs, method="himap(k1=1,r1=0.5)", k1=3, k2=2)  # a whole spec; parentheses win
    assert lm.spec.config["k1"] == 1 and lm.spec.config["k2"] == 2 and lm.spec.config["r2"] == 0.75
    lm = HimapEvalModel.create_from_arg_string(
        f"pretrained={env.model_dir},method=vtw,dtype=float32", {"device": "cpu"}
    )
    assert lm.spec.label == "vtw" and lm.spec.config == {"k": 2}
    lm = HimapEvalModel.create_from_arg_string(
        f"pretrained={env.model_dir},method=fastv,criterion=mean_received,r=5e-1,dtype=float32", {"device": "cpu"}
    )
    assert lm.spec.config == {"k": 2, "r": 0.5, "criterion": "mean_received"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        HimapEvalModel.create_from_arg_string(f"pretrained={env.model_dir},fastv")
    with pytest.raises(MethodSpecError, match="does not take 'q'"):
        HimapEvalModel.create_from_arg_string(f"pretrained={env.model_dir},method=fastv,q=1")
