"""pytest plugin of the conformance run: installs a himap method on every model the tests build.

Loaded with ``-p himap_conformance_plugin`` (``scripts/conformance/run.py`` puts this folder on
``PYTHONPATH``). Options:

``--himap-mode off|noop|prune``
    ``off``: nothing is installed (the baseline); ``noop``: ``FastV(k, r=0.0)`` (scores are
    recomputed, nothing is dropped); ``prune``: ``FastV(k, r=0.5)``. ``k`` is the first layer the
    model's family allows (1, or after Qwen3-VL's DeepStack layers); a model with too few decoder
    layers for that stays untouched and is counted as refused.
``--himap-record FILE``
    JSON written at the end of the session: per test, its outcome (failed if any phase or subtest
    failed) with the first line of the failure, and per test the models built, the models that got
    a method, the refusals, the prefills the engine saw and the prefills in which it really dropped
    image tokens.

Mechanism: ``PreTrainedModel.post_init`` (which every transformers model calls at the end of its
``__init__``, so also under ``from_pretrained`` and ``_from_config``) is wrapped; when the model
just built is of a class himap supports, ``method(model)`` is entered there, and left at the
test's teardown. Sub-models built inside it (vision towers, text models, ``LlavaModel``) and
models of classes himap does not support stay untouched and are counted by class. Copies made with
``copy.deepcopy`` do not pass through ``post_init``: they get exactly what ``deepcopy`` of a model
inside a ``with method(model):`` block gives a user.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import pytest

MODES = ("off", "noop", "prune")
PRUNE_RATIO = {"noop": 0.0, "prune": 0.5}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("himap-conformance")
    group.addoption("--himap-mode", choices=MODES, default="off", help="method installed on every model built")
    group.addoption("--himap-record", default=None, help="JSON file for outcomes and per-test model statistics")


class _Recorder:
    def __init__(self, mode: str, record: str | None):
        self.mode = mode
        self.record = record
        self.current: str | None = None
        self.runs: list[Any] = []  # (run, handle) entered during the current test
        self.stats: dict[str, dict[str, Any]] = {}
        self.outcomes: dict[str, dict[str, Any]] = {}
        self._orig_post_init = None

    # ------------------------------------------------------------------ model construction
    def install(self) -> None:
        from transformers import PreTrainedModel

        recorder = self
        orig = PreTrainedModel.post_init
        self._orig_post_init = orig

        def post_init(model, *args, **kwargs):
            out = orig(model, *args, **kwargs)
            recorder.on_model_built(model)
            return out

        post_init.__wrapped__ = orig  # type: ignore[attr-defined]
        PreTrainedModel.post_init = post_init

    def uninstall(self) -> None:
        if self._orig_post_init is not None:
            from transformers import PreTrainedModel

            PreTrainedModel.post_init = self._orig_post_init
            self._orig_post_init = None

    def _test_stats(self) -> dict[str, Any]:
        key = self.current or "<outside a test>"
        if key not in self.stats:
            self.stats[key] = {
                "built": 0,
                "applied": 0,
                "refused": Counter(),
                "untouched": Counter(),
                "prefills": 0,
                "pruned_prefills": 0,
            }
        return self.stats[key]

    def on_model_built(self, model: Any) -> None:
        if getattr(model, "_himap_conformance_seen", False):
            return  # post_init called twice for one model (a subclass calling it again)
        object.__setattr__(model, "_himap_conformance_seen", True)
        st = self._test_stats()
        st["built"] += 1
        from himap_vlm import FastV
        from himap_vlm.core.families import resolve_family

        cls = type(model).__name__
        if self.mode == "off":
            st["untouched"][cls] += 1
            return
        try:
            family = resolve_family(model)
        except ValueError:
            st["untouched"][cls] += 1
            return
        try:
            k = max(1, int(family.min_prune_layer(model.config)))
            run = FastV(k=k, r=PRUNE_RATIO[self.mode])(model)
            run.attach()
        except (ValueError, RuntimeError) as exc:
            st["refused"][f"{cls}: {str(exc).splitlines()[0][:160]}"] += 1
            return
        st["applied"] += 1
        handle = run.decoder.register_forward_hook(self._make_counter(run, st))
        self.runs.append((run, handle))

    @staticmethod
    def _make_counter(run: Any, st: dict[str, Any]):
        seen = {"prefills": run.num_prefills}

        def hook(module, args, output):
            if run.num_prefills == seen["prefills"]:
                return None  # not a prefill (decode step or pass-through)
            st["prefills"] += run.num_prefills - seen["prefills"]
            seen["prefills"] = run.num_prefills
            per_layer = run.image_tokens_per_layer
            if per_layer and any(
                last < first for first, last in zip(per_layer[0], per_layer[-1], strict=False)
            ):
                st["pruned_prefills"] += 1
            return None

        return hook

    def leave_all(self) -> None:
        for run, handle in reversed(self.runs):
            handle.remove()
            run.detach()
        self.runs.clear()

    # ------------------------------------------------------------------ outcomes
    def on_report(self, report: pytest.TestReport) -> None:
        entry = self.outcomes.setdefault(report.nodeid, {"outcome": "passed", "message": "", "seconds": 0.0})
        entry["seconds"] = round(entry["seconds"] + float(getattr(report, "duration", 0.0) or 0.0), 3)
        if report.failed:
            if entry["outcome"] != "failed":
                entry["message"] = _first_line(report)
            entry["outcome"] = "failed"
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
            entry["message"] = _first_line(report)

    def write(self) -> None:
        if not self.record:
            return
        stats = {
            k: {**v, "refused": dict(v["refused"]), "untouched": dict(v["untouched"])}
            for k, v in self.stats.items()
        }
        data = {"mode": self.mode, "outcomes": self.outcomes, "models": stats}
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        path = self.record if worker is None else f"{self.record}.{worker}"
        with open(path, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)


def _seed(nodeid: str) -> None:
    """Seed every generator the tests draw from with the test's id: results do not depend on order,
    on which tests share a process, or on the mode."""
    import random
    import sys
    import zlib

    import numpy as np
    import torch

    seed = zlib.crc32(nodeid.split("::", 1)[-1].encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for name, mod in list(sys.modules.items()):
        rng = getattr(mod, "global_rng", None) if name.endswith("test_modeling_common") else None
        if isinstance(rng, random.Random):
            rng.seed(seed)  # ids_tensor / floats_tensor draw from this module-level generator


def _first_line(report: pytest.TestReport) -> str:
    lr = report.longrepr
    if lr is None:
        return ""
    if isinstance(lr, tuple):  # skip: (path, line, reason)
        return str(lr[-1])[:300]
    crash = getattr(lr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).splitlines()[0][:300] if crash.message else ""
    text = str(lr).strip().splitlines()
    return text[-1][:300] if text else ""


_REC: _Recorder | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _REC
    import torch

    torch.set_num_threads(1)  # tiny models: one thread is faster and deterministic
    _REC = _Recorder(config.getoption("--himap-mode"), config.getoption("--himap-record"))
    _REC.install()  # also in "off": models are counted there too


def pytest_unconfigure(config: pytest.Config) -> None:
    if _REC is not None:
        _REC.leave_all()
        _REC.uninstall()
        _REC.write()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    assert _REC is not None
    _REC.leave_all()
    _REC.current = item.nodeid
    _seed(item.nodeid)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: Any) -> None:
    assert _REC is not None
    _REC.leave_all()
    _REC.current = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _REC is not None:
        _REC.on_report(report)


def stats_total(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sum the per-test model statistics (used by run.py)."""
    total: dict[str, Any] = {"built": 0, "applied": 0, "prefills": 0, "pruned_prefills": 0}
    refused: Counter = Counter()
    untouched: Counter = Counter()
    for v in stats.values():
        for key in total:
            total[key] += v.get(key, 0)
        refused.update(v.get("refused", {}))
        untouched.update(v.get("untouched", {}))
    total["refused"] = dict(refused)
    total["untouched"] = dict(untouched)
    return total

