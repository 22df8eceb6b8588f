"""transformers' source archive (sdist) from the package index: download, verify, extract, inspect.

Only the package index is contacted (``https://pypi.org`` unless ``HIMAP_PYPI_URL`` says
otherwise): its JSON API gives the sdist's URL and sha256; the file is cached under
``.cache/conformance/`` (a folder that ignores itself in git) and its sha256 is checked against
the index on download and again on every use.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "conformance"
PYPI = os.environ.get("HIMAP_PYPI_URL", "https://pypi.org").rstrip("/")
MIXIN_FILE = "tests/test_modeling_common.py"
MIXIN_CLASS = "ModelTesterMixin"


class ArchiveError(RuntimeError):
    """The archive could not be fetched or does not verify."""


@dataclass(frozen=True)
class Sdist:
    version: str
    filename: str
    url: str
    sha256: str
    size: int


def ensure_cache() -> Path:
    """The cache folder, made to ignore itself in git."""
    CACHE.mkdir(parents=True, exist_ok=True)
    marker = CACHE.parent / ".gitignore"
    if not marker.exists():
        marker.write_text("# made by scripts/conformance: downloaded archives and run outputs\n*\n")
    return CACHE


def _get_json(url: str) -> dict:
    req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "himap-conformance"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)


def sdist_info(version: str, package: str = "transformers") -> Sdist:
    """The sdist of ``package==version`` as the index's JSON API describes it.

    The per-release endpoint is tried first, then the project endpoint (some mirrors of the index
    serve only the latter).
    """
    files = None
    errors = []
    for url in (f"{PYPI}/pypi/{package}/{version}/json", f"{PYPI}/pypi/{package}/json"):
        try:
            data = _get_json(url)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
            continue
        files = data.get("urls") if url.endswith(f"/{version}/json") else data.get("releases", {}).get(version)
        if files is not None:
            base = url
            break
        errors.append(f"{url}: no release {version}")
    if files is None:
        raise ArchiveError(f"the package index does not describe {package} {version}: " + "; ".join(errors))
    sdists = [f for f in files if f.get("packagetype") == "sdist"]
    if not sdists:
        raise ArchiveError(f"{package} {version} has no source archive (sdist) on the package index")
    f = sdists[0]
    return Sdist(
        version=version,
        filename=f["filename"],
        url=urllib.parse.urljoin(base, f["url"]),
        sha256=f["digests"]["sha256"],
        size=int(f.get("size") or 0),
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(version: str, log=print) -> Path:
    """The verified sdist of transformers ``version`` in the cache (downloaded if missing).

    The expected sha256 comes from the index every time (a cached file is re-verified); when the
    index cannot be reached, a cached file is used only if it verifies against the digest recorded
    at download time.
    """
    cache = ensure_cache()
    record = cache / f"transformers-{version}.sha256"
    try:
        info = sdist_info(version)
    except ArchiveError as exc:
        path = cache / f"transformers-{version}.tar.gz"
        if path.exists() and record.exists() and _sha256(path) == record.read_text().split()[0]:
            log(f"package index unreachable ({exc}); using the cached archive verified at download")
            return path
        raise
    path = cache / info.filename
    if path.exists() and _sha256(path) != info.sha256:
        log(f"cached {path.name} does not match the index's sha256; downloading it again")
        path.unlink()
    if not path.exists():
        log(f"downloading {info.url} ({info.size / 1e6:.1f} MB)")
        tmp = path.with_suffix(".part")
        req = urllib.request.Request(info.url, headers={"User-Agent": "himap-conformance"})
        with urllib.request.urlopen(req, timeout=300) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out)
        got = _sha256(tmp)
        if got != info.sha256:
            tmp.unlink()
            raise ArchiveError(f"{info.filename}: sha256 {got} does not match the index's {info.sha256}")
        tmp.rename(path)
    record.write_text(f"{info.sha256}  {info.filename}\n")
    log(f"{path.name}: sha256 {info.sha256} (verified against the package index)")
    return path


def extract_tests(archive: Path, version: str) -> Path:
    """Extract the archive's ``tests/`` folder to the cache; returns the folder holding ``tests``."""
    dest = CACHE / f"transformers-{version}"
    done = dest / ".extracted"
    if done.exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) > 1 and parts[1] == "tests" and (m.isfile() or m.isdir()):
                m.name = str(Path(*parts[1:]))
                members.append(m)
        tar.extractall(dest, members=members, filter="data")
    done.write_text(version)
    return dest


def archive_listing(archive: Path) -> list[str]:
    """Every path in the archive, relative to its top folder."""
    with tarfile.open(archive) as tar:
        return sorted(str(Path(*Path(n).parts[1:])) for n in tar.getnames() if len(Path(n).parts) > 1)


def mixin_tests(tests_root: Path) -> set[str]:
    """Names of the ``test_*`` functions ``ModelTesterMixin`` defines in the archive (by reading its source)."""
    src = (tests_root / MIXIN_FILE).read_text()
    tree = ast.parse(src)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == MIXIN_CLASS:
            return {
                n.name for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
            }
    raise ArchiveError(f"{MIXIN_FILE} of the archive has no class {MIXIN_CLASS}")


def base_test_name(test_id: str, known: set[str]) -> str:
    """The function name behind a test id: the id's last part, or, for the ``_NN_...`` variants that
    ``parameterized.expand`` makes, the longest ``known`` name it extends."""
    name = test_id.split("::")[-1]
    if name in known:
        return name
    best = ""
    for k in known:
        if len(k) > len(best) and re.match(re.escape(k) + r"_\d+(?:_|$)", name):
            best = k
    return best or name
