#!/usr/bin/env python
"""Conformance: transformers' own shared model tests, run on tiny models with and without himap installed.

    .venv/bin/python scripts/conformance/run.py [--families llava,qwen2_vl] [--modes off,noop,prune]
                                                [--jobs 2] [--allow-known-bugs] [--out DIR]

1. Downloads the source archive (sdist) of the *installed* transformers release from the package
   index, checks its sha256 against the index's JSON metadata and caches it in
   ``.cache/conformance/`` (ignored by git).
2. Builds a test tree from the archive's ``tests/``: its ``test_modeling_common.py``
   (``ModelTesterMixin``) plus himap's tiny testers (``scripts/conformance/testers``: the archive
   ships no ``tests/models/*``) and empty stand-ins for the mixins it imports but does not ship
   (``tests/generation/test_utils.py``, ``tests/exporters/test_export.py``).
3. Runs every mixin test on every supported family three times: ``off`` (no himap), ``noop``
   (``FastV(k, r=0.0)`` installed on every model the tests build) and ``prune``
   (``FastV(k, r=0.5)``; ``k`` = 1, or the first layer after Qwen3-VL's DeepStack layers), through
   the pytest plugin ``himap_conformance_plugin.py``.
4. Prints a table (family, mode, passed, failed, skipped, regressions, models with a method,
   prefills that dropped tokens) and every regression: a test that passes in ``off`` and fails (or
   skips, or vanishes) in ``noop`` or ``prune``. Exit status 1 on any regression not in the reviewed
   lists of ``exclusions.py`` (known engine bugs count unless ``--allow-known-bugs``), on a
   known-bug entry that no longer reproduces, if ``prune`` never dropped a token or ``noop`` did,
   or if a run broke.

Test-only dependencies (installed into this interpreter's environment from the package index
when missing): see ``requirements.txt`` beside this file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import archive  # noqa: E402
import exclusions  # noqa: E402
from himap_conformance_plugin import stats_total  # noqa: E402

MODES = ("off", "noop", "prune")

# family key -> (tester file, test class, label). Costs: CPU seconds of one mode on a 2-core box
# (measured, transformers 5.24), used only to balance the parallel jobs.
FAMILIES = {
    "llava": ("test_llava.py", "LlavaConformanceTest", "LLaVA-1.5", 14),
    "llava_next": ("test_llava_next.py", "LlavaNextConformanceTest", "LLaVA-NeXT", 16),
    "llava_onevision": ("test_llava_onevision.py", "LlavaOnevisionConformanceTest", "LLaVA-OneVision", 22),
    "qwen2_vl": ("test_qwen2_vl.py", "Qwen2VLConformanceTest", "Qwen2-VL", 18),
    "qwen2_5_vl": ("test_qwen2_5_vl.py", "Qwen25VLConformanceTest", "Qwen2.5-VL", 18),
    "qwen3_vl": ("test_qwen3_vl.py", "Qwen3VLConformanceTest", "Qwen3-VL", 20),
    "internvl": ("test_internvl.py", "InternVLConformanceTest", "InternVL", 16),
    "idefics3": ("test_idefics3.py", "Idefics3ConformanceTest", "Idefics3", 14),
    "smolvlm": ("test_smolvlm.py", "SmolVLMConformanceTest", "SmolVLM", 14),
    "gemma3": ("test_gemma3.py", "Gemma3ConformanceTest", "Gemma3", 20),
}
CLASS_TO_FAMILY = {v[1]: k for k, v in FAMILIES.items()}

# Modules test_modeling_common.py imports that the archive may lack -> our empty stand-in.
STUBS = {
    "tests/generation/test_utils.py": "stubs/generation_test_utils.py",
    "tests/exporters/test_export.py": "stubs/exporters_test_export.py",
}
MARKERS = ("flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test", "generate")


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- setup
def ensure_test_dependencies() -> list[str]:
    """Install the test-only requirements that this environment lacks; returns the requirement lines."""
    reqs = [
        line.split("#")[0].strip()
        for line in (HERE / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    missing = []
    for req in reqs:
        name, _, version = req.partition("==")
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != version:
            missing.append(req)
    if missing:
        log(f"installing test-only dependencies: {' '.join(missing)}")
        uv = shutil.which("uv")
        cmd = [uv, "pip", "install", "--quiet", "--python", sys.executable] if uv else [
            sys.executable, "-m", "pip", "install", "--quiet"]
        subprocess.run([*cmd, *missing], check=True)
    return reqs


def build_tree(extracted: Path, version: str, listing: list[str]) -> tuple[Path, list[str]]:
    """A fresh test tree: the archive's tests, himap's testers and stand-ins; returns (tree, notes)."""
    tree = archive.CACHE / f"tree-{version}"
    if tree.exists():
        shutil.rmtree(tree)
    shutil.copytree(extracted / "tests", tree / "tests")
    notes = []
    for target, stub in STUBS.items():
        path = tree / target
        if path.exists():
            notes.append(f"{target}: shipped by the archive (used as is)")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(HERE / stub, path)
            notes.append(f"{target}: NOT in the archive -> empty stand-in mixin (none of its tests run)")
    shutil.copytree(HERE / "testers", tree / "tests" / "himap_conformance")
    for folder in [tree / "tests", *[p for p in (tree / "tests").rglob("*") if p.is_dir()]]:
        if folder.name != "__pycache__" and not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text("")
    (tree / "pytest.ini").write_text(
        "[pytest]\n# written by scripts/conformance/run.py\naddopts = -p no:cacheprovider\nmarkers =\n"
        + "".join(f"    {m}: transformers test marker\n" for m in MARKERS)
    )
    models = sorted({p.split("/")[2] for p in listing if p.startswith("tests/models/") and p.count("/") >= 3})
    notes.append(
        f"tests/models/: {'families ' + ', '.join(models) if models else 'NOT in the archive'} -> "
        "himap's own tiny testers (scripts/conformance/testers) for every family"
    )
    return tree, notes


def chunks(families: list[str], n: int) -> list[list[str]]:
    """Split families into ``n`` groups of similar measured cost (greedy, deterministic)."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(n, len(families))))]
    load = [0.0] * len(groups)
    for fam in sorted(families, key=lambda f: (-FAMILIES[f][3], f)):
        i = load.index(min(load))
        groups[i].append(fam)
        load[i] += FAMILIES[fam][3]
    return [sorted(g, key=list(FAMILIES).index) for g in groups if g]


def run_job(tree: Path, out: Path, mode: str, group: list[str], index: int, extra: list[str]) -> dict:
    record = out / f"{mode}-{index}.json"
    logfile = out / "logs" / f"{mode}-{index}.log"
    files = [f"tests/himap_conformance/{FAMILIES[f][0]}" for f in group]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-c", "pytest.ini", "--rootdir", ".", "-p", "himap_conformance_plugin",
        "--himap-mode", mode, "--himap-record", str(record), "-rN", "--no-header", "--tb=short", *extra, *files,
    ]
    t0 = time.time()
    with open(logfile, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        rc = proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - t0
    cpu = usage.ru_utime + usage.ru_stime
    data = json.loads(record.read_text()) if record.exists() else {"outcomes": {}, "models": {}}
    return {"mode": mode, "group": group, "rc": rc, "seconds": seconds, "cpu_seconds": cpu, "log": str(logfile), **data}


# ---------------------------------------------------------------------------------------------- analysis
def family_of(nodeid: str) -> str | None:
    parts = nodeid.split("::")
    return CLASS_TO_FAMILY.get(parts[1]) if len(parts) > 2 else None


def analyse(results: list[dict], families: list[str], modes: list[str], known: set[str]) -> dict:
    outcomes: dict[str, dict[str, dict]] = {m: {} for m in modes}
    models: dict[str, dict[str, dict]] = {m: defaultdict(dict) for m in modes}
    for r in results:
        outcomes[r["mode"]].update(r["outcomes"])
        for nodeid, st in r["models"].items():
            fam = family_of(nodeid)
            if fam:
                models[r["mode"]][fam][nodeid] = st
    base = outcomes.get("off", {})
    rows, regressions, fixed = [], [], []
    for fam in families:
        cls = FAMILIES[fam][1]
        for mode in modes:
            ids = {k: v for k, v in outcomes[mode].items() if family_of(k) == fam}
            c = Counter(v["outcome"] for v in ids.values())
            per_test = models[mode].get(fam, {})
            total = stats_total(per_test)
            pruned_tests = sum(1 for st in per_test.values() if st.get("pruned_prefills"))
            row = {
                "family": fam, "label": FAMILIES[fam][2], "mode": mode, "passed": c["passed"], "failed": c["failed"],
                "skipped": c["skipped"], "regressions": 0, "models_built": total["built"],
                "models_with_method": total["applied"], "refused": total["refused"],
                "prefills": total["prefills"], "pruned_prefills": total["pruned_prefills"],
                "tests_that_pruned": pruned_tests,
            }
            if mode != "off":
                for nodeid, ref in base.items():
                    if family_of(nodeid) != fam:
                        continue
                    now = ids.get(nodeid, {"outcome": "missing", "message": "not run in this mode"})
                    if ref["outcome"] == "passed" and now["outcome"] != "passed":
                        name = archive.base_test_name(nodeid, known)
                        kind, reason = "new", ""
                        for e in exclusions.BY_DEFINITION:
                            if e.matches(mode, cls, name):
                                kind, reason = "by-definition", e.reason
                        for e in exclusions.KNOWN_ENGINE_BUGS:
                            if kind == "new" and e.matches(mode, cls, name):
                                kind, reason = "known-bug", e.reason
                        regressions.append({
                            "id": nodeid, "family": fam, "mode": mode, "test": name, "outcome": now["outcome"],
                            "message": now["message"], "kind": kind, "reason": reason,
                        })
                        row["regressions"] += 1
                    elif ref["outcome"] == "failed" and now["outcome"] == "passed":
                        fixed.append({"id": nodeid, "mode": mode})
            rows.append(row)
    return {"rows": rows, "regressions": regressions, "fixed": fixed}


def print_table(rows: list[dict]) -> str:
    head = ["family", "mode", "passed", "failed", "skipped", "regressions", "models w/ method",
            "prefills pruned/seen", "tests that pruned"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['mode']} | {r['passed']} | {r['failed']} | {r['skipped']} | {r['regressions']} | "
            f"{r['models_with_method']} of {r['models_built']} | {r['pruned_prefills']}/{r['prefills']} | "
            f"{r['tests_that_pruned']} |"
        )
    return "\n".join(lines)


def print_lists(known: set[str] | None) -> list[str]:
    """Print both reviewed lists; returns the names missing from the installed archive (stale)."""
    stale = []
    for title, entries in (("tests that cannot hold under real pruning (BY_DEFINITION)", exclusions.BY_DEFINITION),
                           ("known engine bugs (KNOWN_ENGINE_BUGS)", exclusions.KNOWN_ENGINE_BUGS)):
        log(f"== reviewed list: {title}, written for transformers {exclusions.WRITTEN_FOR}: {len(entries)} entries")
        for e in entries:
            where = ",".join(e.families) or "all families"
            flag = ""
            if known is not None and e.test not in known:
                flag = "  [STALE: not in this archive's ModelTesterMixin]"
                stale.append(e.test)
            log(f"  - {e.test} [{'/'.join(e.modes)}; {where}]{flag}\n      reason: {e.reason}")
    return stale


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel pytest processes")
    ap.add_argument("--allow-known-bugs", action="store_true", help="known engine bugs do not fail the run")
    ap.add_argument("--out", default=None, help="report folder (default .cache/conformance/report-VERSION)")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression (for debugging a subset)")
    args = ap.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [f for f in families if f not in FAMILIES] + [m for m in modes if m not in MODES]
    if bad or "off" not in modes:
        ap.error(f"unknown families/modes {bad}; 'off' (the baseline) is required")
    t_start = time.time()

    import torch
    import transformers

    version = transformers.__version__
    log(f"== himap conformance: transformers {version}, torch {torch.__version__}, python {sys.version.split()[0]}")
    reqs = ensure_test_dependencies()
    log(f"== test-only dependencies: {' '.join(reqs)}")
    sdist = archive.fetch(version, log=lambda m: log(f"   {m}"))
    extracted = archive.extract_tests(sdist, version)
    listing = archive.archive_listing(sdist)
    known = archive.mixin_tests(extracted)
    tree, notes = build_tree(extracted, version, listing)
    log(f"== archive {sdist.name}: {sum(p.startswith('tests/') for p in listing)} entries under tests/; "
        f"ModelTesterMixin defines {len(known)} test functions")
    for n in notes:
        log(f"   {n}")
    stale = print_lists(known)

    out = Path(args.out) if args.out else archive.CACHE / f"report-{version}"
    if out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    extra = ["-k", args.keyword] if args.keyword else []
    groups = chunks(families, args.jobs)
    jobs = [(mode, g, i) for mode in modes for i, g in enumerate(groups)]
    log(f"== running {len(jobs)} pytest processes ({len(modes)} modes x {len(groups)} groups), {args.jobs} at a time; "
        f"logs in {out / 'logs'}")
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_job, tree, out, mode, g, i, extra) for mode, g, i in jobs]
        for fut in concurrent.futures.as_completed(futures):
            r = fut.result()
            c = Counter(v["outcome"] for v in r["outcomes"].values())
            log(f"   {r['mode']:5} {','.join(r['group'])}: {c['passed']} passed, {c['failed']} failed, "
                f"{c['skipped']} skipped in {r['seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU (pytest exit {r['rc']})")
            results.append(r)
    results.sort(key=lambda r: (modes.index(r["mode"]), families.index(r["group"][0])))

    res = analyse(results, families, modes, known)
    problems = []
    for r in results:
        if r["rc"] not in (0, 1) or not r["outcomes"]:
            problems.append(f"pytest {r['mode']} {','.join(r['group'])} broke (exit {r['rc']}; see {r['log']})")
    for row in res["rows"]:
        if row["mode"] == "off":
            continue
        if row["models_with_method"] == 0:
            problems.append(f"{row['label']} {row['mode']}: the method was never installed on a model")
        if row["mode"] == "prune" and row["pruned_prefills"] == 0:
            problems.append(f"{row['label']} prune: no prefill dropped an image token (pruning never happened)")
        if row["mode"] == "noop" and row["pruned_prefills"] != 0:
            problems.append(f"{row['label']} noop: {row['pruned_prefills']} prefills dropped tokens with r=0")
        for what, n in row["refused"].items():
            problems.append(f"{row['label']} {row['mode']}: method refused {n}x: {what}")

    log("")
    table = print_table(res["rows"])
    log(table)
    by_kind = defaultdict(list)
    for reg in res["regressions"]:
        by_kind[reg["kind"]].append(reg)
    for kind, title in (("new", "NEW REGRESSIONS (not in any reviewed list)"),
                        ("known-bug", "regressions from known engine bugs (KNOWN_ENGINE_BUGS)"),
                        ("by-definition", "regressions that cannot hold by definition (BY_DEFINITION)")):
        regs = by_kind.get(kind, [])
        log(f"\n== {title}: {len(regs)}")
        for reg in regs:
            log(f"  {reg['mode']:5} {reg['id']}\n        -> {reg['outcome']}: {reg['message']}")
    used = {(r["test"], r["mode"]) for r in by_kind.get("known-bug", [])}
    for e in exclusions.KNOWN_ENGINE_BUGS:
        if not any(t == e.test and m in e.modes for t, m in used) and set(e.modes) & set(modes):
            if not args.keyword:
                problems.append(f"known-bug entry {e.test} no longer reproduces: delete it from exclusions.py")
    if res["fixed"]:
        log(f"\n== {len(res['fixed'])} tests fail without himap and pass with it (informational)")
    if stale:
        log(f"\n== stale list entries for transformers {version}: {', '.join(stale)}")
    if by_kind.get("new"):
        problems.append(f"{len(by_kind['new'])} new regressions")
    if by_kind.get("known-bug") and not args.allow_known_bugs:
        problems.append(f"{len(by_kind['known-bug'])} regressions from known engine bugs (--allow-known-bugs to accept)")

    elapsed = time.time() - t_start
    report = {
        "transformers": version, "torch": torch.__version__, "archive": sdist.name,
        "archive_sha256": archive._sha256(sdist), "notes": notes, "requirements": reqs, "families": families,
        "modes": modes, "seconds": round(elapsed, 1), "rows": res["rows"], "regressions": res["regressions"],
        "fixed": res["fixed"], "stale": stale, "problems": problems,
        "cpu_seconds": round(sum(r["cpu_seconds"] for r in results), 1),
        "jobs": [{k: r[k] for k in ("mode", "group", "rc", "seconds", "cpu_seconds", "log")} for r in results],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "table.md").write_text(table + "\n")
    cpu = sum(r["cpu_seconds"] for r in results)
    log(f"\n== report: {out / 'report.json'}; wall time {elapsed:.0f} s; pytest processes used {cpu:.0f} CPU-seconds "
        f"(about {cpu / max(1, args.jobs):.0f} s of wall time on {args.jobs} idle cores)")
    if problems:
        log("== conformance FAILED:")
        for p in problems:
            log(f"   - {p}")
        return 1
    n_known = len(by_kind.get("known-bug", []))
    log(f"== conformance passed ({n_known} regressions from known engine bugs accepted)" if n_known
        else "== conformance passed: no regressions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
