"""The conformance harness (scripts/conformance): its reviewed lists, testers and bookkeeping.

The conformance run itself (transformers' shared model tests with himap installed) is
``scripts/conformance/run.py``; it takes minutes and runs in ``.ci/run``. These tests are fast:
they check what the run relies on.
"""

from __future__ import annotations

import re
import sys
import urllib.error
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "scripts" / "conformance"
sys.path.insert(0, str(HERE))

import archive  # noqa: E402
import exclusions  # noqa: E402
import run  # noqa: E402

ALL_ENTRIES = [*exclusions.BY_DEFINITION, *exclusions.KNOWN_ENGINE_BUGS]


@pytest.fixture(scope="module")
def written_for_mixin_tests() -> set[str]:
    """``ModelTesterMixin``'s test functions in the archive the lists were written for (cached download)."""
    try:
        sdist = archive.fetch(exclusions.WRITTEN_FOR, log=lambda m: None)
    except (archive.ArchiveError, urllib.error.URLError, OSError) as exc:
        pytest.skip(f"transformers {exclusions.WRITTEN_FOR} sdist neither cached nor downloadable: {exc}")
    return archive.mixin_tests(archive.extract_tests(sdist, exclusions.WRITTEN_FOR))


def test_every_listed_test_exists_in_the_archive_it_was_written_for(written_for_mixin_tests):
    stale = [e.test for e in ALL_ENTRIES if e.test not in written_for_mixin_tests]
    assert not stale, f"stale entries (not in transformers {exclusions.WRITTEN_FOR} ModelTesterMixin): {stale}"
    assert "test_eager_matches_sdpa_inference" in written_for_mixin_tests


def test_entries_are_well_formed():
    classes = {v[1] for v in run.FAMILIES.values()}
    for e in ALL_ENTRIES:
        assert re.fullmatch(r"test_\w+", e.test), e
        assert e.modes and set(e.modes) <= {"noop", "prune"}, e
        assert e.reason.strip() and "\n" not in e.reason, e
        assert set(e.families) <= classes, e
    keys = [(e.test, e.modes, e.families) for e in ALL_ENTRIES]
    assert len(keys) == len(set(keys))


def test_testers_cover_every_supported_class():
    from himap_vlm import supported_classes

    found = {}
    for key, (file, cls, _label, _cost) in run.FAMILIES.items():
        src = (HERE / "testers" / file).read_text()
        assert f"class {cls}(" in src, (key, cls)
        m = re.search(r"all_model_classes = \((\w+),\)", src)
        assert m, file
        found[m.group(1)] = key
    assert sorted(found) == supported_classes()


def test_parameterized_names_resolve_to_their_function():
    known = {"test_eager_matches_sdpa_inference", "test_flash_attn_2_inference_equivalence", "test_get_image_features_output"}
    assert archive.base_test_name("a.py::C::test_eager_matches_sdpa_inference_09_fp32_pad_left", known) == (
        "test_eager_matches_sdpa_inference"
    )
    assert archive.base_test_name("a.py::C::test_flash_attn_2_inference_equivalence", known) == (
        "test_flash_attn_2_inference_equivalence"
    )
    assert archive.base_test_name("a.py::C::test_get_image_features_output_2", known) == "test_get_image_features_output"
    assert archive.base_test_name("a.py::C::test_unknown_3", known) == "test_unknown_3"


def test_chunks_cover_every_family_once_and_are_deterministic():
    fams = list(run.FAMILIES)
    for n in (1, 2, 3):
        groups = run.chunks(fams, n)
        assert sorted(f for g in groups for f in g) == sorted(fams)
        assert groups == run.chunks(list(reversed(fams)), n)


def _result(mode, outcomes, models=None):
    return {"mode": mode, "group": ["llava"], "outcomes": outcomes, "models": models or {}}


def test_regressions_are_classified(monkeypatch):
    p = "tests/himap_conformance/test_llava.py::LlavaConformanceTest::"
    ok = {"outcome": "passed", "message": ""}
    bad = {"outcome": "failed", "message": "boom"}
    monkeypatch.setattr(exclusions, "BY_DEFINITION", (exclusions.Entry("test_b", ("prune",), "cannot hold"),))
    monkeypatch.setattr(exclusions, "KNOWN_ENGINE_BUGS", (exclusions.Entry("test_c", ("prune",), "bug"),))
    off = {p + n: ok for n in ("test_a", "test_b", "test_c_01_fp32", "test_d", "test_e")}
    off[p + "test_f"] = bad
    prune = {p + "test_a": bad, p + "test_b": bad, p + "test_c_01_fp32": bad, p + "test_d": ok, p + "test_f": ok}
    models = {p + "test_a": {"built": 3, "applied": 1, "prefills": 2, "pruned_prefills": 2}}
    res = run.analyse(
        [_result("off", off), _result("prune", prune, models)], ["llava"], ["off", "prune"],
        {"test_a", "test_b", "test_c", "test_d", "test_e", "test_f"},
    )
    kinds = {r["id"].split("::")[-1]: (r["kind"], r["outcome"]) for r in res["regressions"]}
    assert kinds == {
        "test_a": ("new", "failed"),
        "test_b": ("by-definition", "failed"),
        "test_c_01_fp32": ("known-bug", "failed"),
        "test_e": ("new", "missing"),  # passed without himap, not run with it
    }
    assert res["fixed"] == [{"id": p + "test_f", "mode": "prune"}]
    row = next(r for r in res["rows"] if r["mode"] == "prune")
    assert (row["regressions"], row["models_with_method"], row["pruned_prefills"], row["tests_that_pruned"]) == (4, 1, 2, 1)
