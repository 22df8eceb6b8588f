"""One timed run of one row on one sample, and the peak-memory pass.

What one *run* (one row, one sample) measures
---------------------------------------------
A greedy generation of ``max_new_tokens`` tokens, written as the loop ``model.generate`` runs
(``do_sample=False``; the tests check the tokens are the same):

``prefill_s``
    The language model's forward over the prompt (a pre-hook and a hook on the decoder module,
    registered *inside* the method's ``with`` block so that the engine's own decoder hooks —
    locating image tokens, scattering the output back — are inside the interval). Excludes the
    vision tower, the projector and the LM head.
``ttft_s``
    Time to first token: the whole first forward (vision tower, projector, language model, LM
    head on the last position) plus the argmax. Processor work (tokenising, resizing) is done
    once per sample before the benchmark and is never timed.
``decode_s`` / ``decode_tokens_per_s``
    The remaining ``max_new_tokens - 1`` tokens (one forward each on the KV cache; for the
    reference-style rows one full forward each, see :mod:`himap_vlm.apps.bench.reference_style`).
``e2e_s``
    ``ttft_s + decode_s``: from the first forward to the last token.
``kv_bytes``
    Sum of ``keys.nbytes + values.nbytes`` over the layers of the real cache right after the
    prefill (0 for reference-style rows, which keep no cache).

CUDA is synchronised before every timestamp when the model is on a GPU.

Peak memory
-----------
Measured in a separate pass after the timed ones (so the sampler never perturbs a timing), one
run per row and sample:

* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the run
  (tensor bytes allocated by the run at its peak, on top of the weights and inputs);
* CPU: the process's resident set size (``psutil``) sampled every 0.5 ms by a thread during the
  run, minus the RSS just before it, after a garbage collection and glibc ``malloc_trim(0)`` (so
  memory freed by earlier runs is not counted as already resident). Short-lived peaks under a
  millisecond can be missed, and the allocator may reuse memory without growing the RSS: read it
  as an order of magnitude, not to the byte.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from himap_vlm.apps.bench.reference_style import reference_generate
from himap_vlm.apps.bench.rows import RowSpec
from himap_vlm.core import contract

__all__ = ["Measurement", "cache_nbytes", "greedy_generate", "measure_peak_memory", "measure_run"]


@dataclass
class Measurement:
    """Raw numbers of one run (one row, one sample, one round). Times in seconds."""

    row: str
    sample: int
    repeat: int
    prefill_s: float
    ttft_s: float
    decode_s: float
    e2e_s: float
    new_tokens: int
    decode_tokens_per_s: float | None
    kv_bytes: int
    image_tokens_per_layer: list[int]
    tokens: list[int]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_nbytes(cache: Any) -> int:
    """Bytes of the key and value tensors held by a transformers cache (0 for ``None``)."""
    if cache is None:
        return 0
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.nbytes
        return total
    for name in ("key_cache", "value_cache"):  # pragma: no cover - older cache classes
        for t in getattr(cache, name, []) or []:
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


class _DecoderTimer:
    """Times each forward of the language-model decoder (hooks registered for one run)."""

    def __init__(self, decoder: nn.Module, device: torch.device):
        self.decoder = decoder
        self.device = device
        self.times: list[float] = []
        self._t0 = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> _DecoderTimer:
        # Registered inside the method's block: the pre-hook goes first and the hook last, so the
        # engine's own decoder hooks are inside the interval.
        self._handles = [
            self.decoder.register_forward_pre_hook(self._pre, prepend=True),
            self.decoder.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, *_: Any) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter() - self._t0)


def greedy_generate(
    model: nn.Module,
    inputs: Mapping[str, Any],
    max_new_tokens: int,
    *,
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, Any]:
    """Greedy generation with a KV cache, the loop of ``model.generate(do_sample=False)``.

    The prefill runs on the whole prompt (``logits_to_keep=1``); every further token is one
    forward of the new token on the cache, with the attention mask extended.

    Parameters
    ----------
    model : nn.Module
    inputs : mapping
        The processor's output (on the model's device).
    max_new_tokens : int
    on_step : callable, optional
        Called with the step index after each token (0: the first token, right after the
        prefill); the runner takes its timestamps there.

    Returns
    -------
    tokens : LongTensor, shape (B, max_new_tokens)
    cache_bytes_after_prefill : int
        :func:`cache_nbytes` of the cache right after the prefill.
    """
    mask = inputs.get("attention_mask")
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    cache = contract.output_cache(out)
    cache_kw = contract.cache_call_kwargs(model, cache)
    del out
    if on_step is not None:
        on_step(0)
    kv = cache_nbytes(cache)
    if on_step is not None:
        on_step(-1)  # bookkeeping done: the decode interval starts here
    tokens = [nxt]
    for step in range(1, max_new_tokens):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=nxt, attention_mask=mask, use_cache=True, logits_to_keep=1, **cache_kw
        )
        nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        del out
        tokens.append(nxt)
        if on_step is not None:
            on_step(step)
    return torch.cat(tokens, dim=1), kv


def measure_run(
    model: nn.Module,
    inputs: Mapping[str, Any],
    row: RowSpec,
    max_new_tokens: int,
    *,
    sample: int = 0,
    repeat: int = 0,
    decoder: nn.Module | None = None,
) -> Measurement:
    """Run one row on one sample and time it (see the module docstring for the definitions).

    Parameters
    ----------
    model : nn.Module
    inputs : mapping
        One sample's processed inputs, on the model's device.
    row : RowSpec
    max_new_tokens : int
        At least 1.
    sample, repeat : int
        Recorded in the result.
    decoder : nn.Module, optional
        The language-model decoder (found with :func:`himap_vlm.core.families.resolve_family` if omitted).

    Returns
    -------
    Measurement
    """
    from himap_vlm.core.families import resolve_family

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    device = next(model.parameters()).device
    decoder = decoder if decoder is not None else resolve_family(model).decoder(model)
    method = row.build()
    stamps: dict[int, float] = {}

    def on_step(step: int) -> None:
        _sync(device)
        stamps[step] = time.perf_counter()

    with torch.no_grad(), method(model) as run, _DecoderTimer(decoder, device) as timer:
        _sync(device)
        t0 = time.perf_counter()
        if row.style == "reference":
            tokens = reference_generate(model, dict(inputs), max_new_tokens, on_step=on_step)
            kv = 0
            stamps[-1] = stamps[0]
        else:
            tokens, kv = greedy_generate(model, inputs, max_new_tokens, on_step=on_step)
    last = stamps[max_new_tokens - 1]
    ttft = stamps[0] - t0
    decode = last - stamps[-1] if max_new_tokens > 1 else 0.0
    counts = [int(c[0]) for c in run.image_tokens_per_layer]
    return Measurement(
        row=row.name,
        sample=sample,
        repeat=repeat,
        prefill_s=timer.times[0],
        ttft_s=ttft,
        decode_s=decode,
        e2e_s=ttft + decode,
        new_tokens=max_new_tokens,
        decode_tokens_per_s=(max_new_tokens - 1) / decode if max_new_tokens > 1 and decode > 0 else None,
        kv_bytes=int(kv),
        image_tokens_per_layer=counts,
        tokens=[int(t) for t in tokens[0].tolist()],
    )


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _RssSampler:
    """Samples the process RSS in a background thread; ``peak`` is the highest value seen."""

    def __init__(self, interval: float = 0.0005):
        import psutil

        self._proc = psutil.Process(os.getpid())
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def measure_peak_memory(
    model: nn.Module, inputs: Mapping[str, Any], row: RowSpec, max_new_tokens: int
) -> int:
    """Peak memory of one run above the memory in use before it, in bytes.

    CUDA: ``max_memory_allocated`` (tensor bytes); CPU: sampled process RSS (see the module
    docstring for what that does and does not catch).
    """
    device = next(model.parameters()).device
    gc.collect(1)  # young generations only: a full collection takes ~0.5 s once transformers is imported
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        measure_run(model, inputs, row, max_new_tokens)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    _malloc_trim()
    import psutil

    base = psutil.Process(os.getpid()).memory_info().rss
    with _RssSampler() as sampler:
        measure_run(model, inputs, row, max_new_tokens)
    return int(max(0, sampler.peak - base))
