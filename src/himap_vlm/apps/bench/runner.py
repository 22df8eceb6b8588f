"""The benchmark runner: dense and pruned runs, interleaved in one process, with raw timings kept.

Everything here sits *on top of* the library: the engine is used exactly as a user would use it
(``with method(model) as run``) and measured from the outside with forward hooks and
``time.perf_counter``; nothing in :mod:`himap_vlm.core.engine` knows it is being timed.

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

Interleaving and statistics
---------------------------
After ``warmup`` untimed rounds (every row on the first sample), each of ``repeats`` rounds
runs every sample with every row; the row order rotates from one (round, sample) to the next so
that no row always runs first. Every run is kept (:class:`Measurement`). Summaries give the
median and quartiles over all runs of a row; *speedups* are medians of **paired** ratios: a row's
run divided by the dense run of the same sample in the same round, so slow drifts of the
machine (other processes, thermal state) cancel.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from himap_vlm.apps.bench.reference_style import ReferenceStyle, reference_generate
from himap_vlm.apps.flops import Layout, flops_ratio_for_run, kv_cache_bytes, layout_from_inputs
from himap_vlm.core import contract
from himap_vlm.core.methods import get_method
from himap_vlm.core.methods.base import PruningMethod

__all__ = [
    "BenchResult",
    "Measurement",
    "RowSpec",
    "RowSummary",
    "Stat",
    "build_rows",
    "cache_nbytes",
    "default_method_args",
    "greedy_generate",
    "measure_peak_memory",
    "measure_run",
    "run_benchmark",
    "summarize",
]

REFERENCE_SUFFIX = " (reference-style)"


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def default_method_args(name: str, num_layers: int) -> dict[str, Any]:
    """Paper settings of a method, with layer indices scaled to a model of ``num_layers`` layers.

    The papers tune LLaVA-1.5-7B (32 layers); on a model of depth ``L``:

    * HiMAP: ``k1=2, r1=0.5, k2=max(k1+1, L//4), r2=0.75`` (paper: K2=8 of 32);
    * FastV: ``k=2, r=0.5``; RandomPrune: ``k=2, r=0.5`` (the FastV setting, random choice);
    * VTW: ``k=L//2`` (paper: K=16 of 32);
    * VisiPruner: ``shallow_layers=max(1, round(6*L/32))`` (paper: 6 of 32), other thresholds as
      in the paper;
    * any other method: its constructor defaults.

    Parameters
    ----------
    name : str
        Registered method name.
    num_layers : int
        Decoder layers of the model.

    Returns
    -------
    dict
        Constructor keyword arguments.
    """
    return dict(get_method(name).defaults_for(num_layers))


@dataclass(frozen=True)
class RowSpec:
    """One row of the benchmark: a method with its arguments, run by our engine or reference-style.

    Attributes
    ----------
    name : str
        Label (``"himap"``, ``"himap (reference-style)"``).
    method : str
        Registered method name.
    args : dict
        Constructor arguments.
    style : {"engine", "reference"}
        ``"engine"``: our engine, SDPA (or the model's kernel), KV cache. ``"reference"``: the
        authors' approach (:class:`~himap_vlm.apps.bench.reference_style.ReferenceStyle`).
    """

    name: str
    method: str
    args: dict[str, Any] = field(default_factory=dict)
    style: str = "engine"

    def build(self) -> PruningMethod:
        """A fresh method instance (wrapped in :class:`ReferenceStyle` for reference rows)."""
        method = get_method(self.method)(**self.args)
        return ReferenceStyle(method) if self.style == "reference" else method


def build_rows(
    methods: Sequence[str],
    num_layers: int,
    method_args: Mapping[str, Mapping[str, Any]] | None = None,
    reference: Sequence[str] = (),
) -> list[RowSpec]:
    """Rows for ``methods`` (dense first, added when missing) and reference-style rows.

    Parameters
    ----------
    methods : sequence of str
        Registered method names.
    num_layers : int
        Decoder layers (for :func:`default_method_args`).
    method_args : mapping, optional
        Per method, arguments overriding the defaults.
    reference : sequence of str
        Methods (among ``methods``) that also get a reference-style row.

    Returns
    -------
    list of RowSpec

    Raises
    ------
    ValueError
        For an unknown method, arguments for a method not requested, a reference row for a
        method not requested, or arguments a method rejects.
    """
    names = [m.strip().lower() for m in methods if m.strip()]
    for n in names:
        get_method(n)
    if "dense" not in names:
        names.insert(0, "dense")
    names = list(dict.fromkeys(names))
    method_args = {k.strip().lower(): dict(v) for k, v in (method_args or {}).items()}
    unknown = sorted(set(method_args) - set(names))
    if unknown:
        raise ValueError(
            f"method arguments given for {', '.join(unknown)}, which are not in the methods to run"
        )
    refs = [r.strip().lower() for r in reference if r.strip()]
    missing = sorted(set(refs) - set(names))
    if missing:
        raise ValueError(
            f"reference-style rows asked for {', '.join(missing)}, which are not in the methods to run"
        )
    rows = []
    for n in names:
        args = {**default_method_args(n, num_layers), **method_args.get(n, {})}
        rows.append(RowSpec(n, n, args))
    for n in refs:
        args = {**default_method_args(n, num_layers), **method_args.get(n, {})}
        rows.append(RowSpec(n + REFERENCE_SUFFIX, n, args, "reference"))
    for row in rows:
        try:
            method = row.build()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{row.name}: {exc}") from exc
        method.validate_for_model(num_layers)
    return rows


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# statistics and results
# ---------------------------------------------------------------------------------------------
@dataclass
class Stat:
    """Median and spread of a list of values (``None`` entries ignored)."""

    median: float | None
    p25: float | None
    p75: float | None
    min: float | None
    max: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        """Statistics of ``values`` (quartiles by linear interpolation)."""
        vals = sorted(float(v) for v in values if v is not None and not math.isnan(float(v)))
        if not vals:
            return cls(None, None, None, None, None, 0)
        return cls(
            statistics.median(vals),
            _quantile(vals, 0.25),
            _quantile(vals, 0.75),
            vals[0],
            vals[-1],
            len(vals),
        )

    def scaled(self, factor: float) -> Stat:
        """The same statistics multiplied by ``factor`` (e.g. seconds to milliseconds)."""

        def f(v: float | None) -> float | None:
            return None if v is None else v * factor

        return Stat(f(self.median), f(self.p25), f(self.p75), f(self.min), f(self.max), self.n)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class RowSummary:
    """Summary of one row over all its runs.

    Attributes
    ----------
    prefill_ms, ttft_ms, e2e_ms, decode_tokens_per_s, peak_memory_bytes : Stat
        Over every run (memory: over the memory pass, one run per sample).
    kv_bytes : int
        Median over samples of the cache bytes after the prefill.
    kv_ratio : float
        ``kv_bytes`` over dense's.
    flops_ratio : float
        Exact-convention prefill FLOPs over dense (:func:`himap_vlm.apps.flops.flops_ratio_for_run`),
        averaged over samples, from the image tokens each layer really processed.
    ideal_speedup : float
        ``1 / flops_ratio``: the prefill speedup if time followed FLOPs.
    prefill_speedup, ttft_speedup, e2e_speedup, decode_speedup : Stat
        Paired ratios against dense (dense time / row time; decode: row tokens/s / dense's).
    measured_over_ideal : float or None
        ``prefill_speedup.median / ideal_speedup``.
    """

    row: str
    method: str
    style: str
    args: dict[str, Any]
    runs: int
    prefill_ms: Stat
    ttft_ms: Stat
    decode_tokens_per_s: Stat
    e2e_ms: Stat
    peak_memory_bytes: Stat
    kv_bytes: int
    kv_ratio: float | None
    flops_ratio: float
    ideal_speedup: float
    prefill_speedup: Stat
    ttft_speedup: Stat
    decode_speedup: Stat
    e2e_speedup: Stat
    measured_over_ideal: float | None
    image_tokens_per_layer: list[int]


@dataclass
class BenchResult:
    """Everything one benchmark produced: settings, environment, raw runs and summaries."""

    model: dict[str, Any]
    settings: dict[str, Any]
    environment: dict[str, Any]
    layouts: list[dict[str, int]]
    rows: list[RowSpec]
    measurements: list[Measurement]
    memory: dict[str, list[int]]
    summary: list[RowSummary]
    kv_predicted_bytes: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (raw runs included)."""
        return {
            "model": self.model,
            "settings": self.settings,
            "environment": self.environment,
            "layouts": self.layouts,
            "rows": [asdict(r) for r in self.rows],
            "summary": [asdict(s) for s in self.summary],
            "measurements": [asdict(m) for m in self.measurements],
            "memory_bytes": self.memory,
            "kv_predicted_bytes": self.kv_predicted_bytes,
        }


def summarize(
    rows: Sequence[RowSpec],
    measurements: Sequence[Measurement],
    memory: Mapping[str, Sequence[int]],
    flops_ratios: Mapping[str, float],
    baseline: str = "dense",
) -> list[RowSummary]:
    """Medians, spreads and paired speedups of every row.

    Parameters
    ----------
    rows : sequence of RowSpec
    measurements : sequence of Measurement
        Every timed run.
    memory : mapping
        Per row, the peak-memory bytes of the memory pass.
    flops_ratios : mapping
        Per row, the prefill FLOPs ratio.
    baseline : str
        The row speedups are measured against.

    Returns
    -------
    list of RowSummary
    """
    by_key = {(m.row, m.sample, m.repeat): m for m in measurements}
    base_kv = [m.kv_bytes for m in measurements if m.row == baseline]
    base_kv_median = statistics.median(base_kv) if base_kv else None
    out = []
    for row in rows:
        runs = [m for m in measurements if m.row == row.name]
        pairs = [(m, by_key.get((baseline, m.sample, m.repeat))) for m in runs]
        pairs = [(m, b) for m, b in pairs if b is not None]

        def ratio(attr: str, invert: bool = False, pairs: list = pairs) -> Stat:
            vals = []
            for m, b in pairs:
                a, c = getattr(m, attr), getattr(b, attr)
                if a is None or c is None or a <= 0 or c <= 0:
                    continue
                vals.append(a / c if invert else c / a)
            return Stat.of(vals)

        kv_by_sample: dict[int, int] = {}
        for m in runs:
            kv_by_sample.setdefault(m.sample, m.kv_bytes)
        kv = int(statistics.median(kv_by_sample.values())) if kv_by_sample else 0
        flops_ratio = float(flops_ratios.get(row.name, 1.0))
        ideal = 1.0 / flops_ratio if flops_ratio > 0 else math.inf
        prefill_speedup = ratio("prefill_s")
        out.append(
            RowSummary(
                row=row.name,
                method=row.method,
                style=row.style,
                args=dict(row.args),
                runs=len(runs),
                prefill_ms=Stat.of([m.prefill_s for m in runs]).scaled(1e3),
                ttft_ms=Stat.of([m.ttft_s for m in runs]).scaled(1e3),
                decode_tokens_per_s=Stat.of([m.decode_tokens_per_s for m in runs]),
                e2e_ms=Stat.of([m.e2e_s for m in runs]).scaled(1e3),
                peak_memory_bytes=Stat.of(list(memory.get(row.name, []))),
                kv_bytes=kv,
                kv_ratio=kv / base_kv_median if base_kv_median else None,
                flops_ratio=flops_ratio,
                ideal_speedup=ideal,
                prefill_speedup=prefill_speedup,
                ttft_speedup=ratio("ttft_s"),
                decode_speedup=ratio("decode_tokens_per_s", invert=True),
                e2e_speedup=ratio("e2e_s"),
                measured_over_ideal=(
                    prefill_speedup.median / ideal if prefill_speedup.median is not None and ideal else None
                ),
                image_tokens_per_layer=runs[0].image_tokens_per_layer if runs else [],
            )
        )
    return out


def _environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg"] = list(os.getloadavg())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _model_info(model: nn.Module) -> dict[str, Any]:
    from himap_vlm.core.families import resolve_family

    family = resolve_family(model)
    text = family.text_config(model)
    return {
        "class": type(model).__name__,
        "family": family.name,
        "num_layers": int(text.num_hidden_layers),
        "hidden_size": int(text.hidden_size),
        "intermediate_size": int(text.intermediate_size),
        "num_heads": int(text.num_attention_heads),
        "num_kv_heads": int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": contract.attn_implementation(text),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def run_benchmark(
    model: nn.Module,
    samples: Sequence[Mapping[str, Any]],
    rows: Sequence[RowSpec],
    *,
    repeats: int = 5,
    warmup: int = 1,
    max_new_tokens: int = 8,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
    baseline: str = "dense",
) -> BenchResult:
    """Benchmark ``rows`` on ``samples``: interleaved timed runs, a memory pass, summaries.

    Parameters
    ----------
    model : nn.Module
        A supported model, in eval mode, on its device.
    samples : sequence of mapping
        Processed inputs, one sample each (batch size 1), already on the model's device.
    rows : sequence of RowSpec
        Must contain the ``baseline`` row (dense).
    repeats : int
        Timed rounds (every sample × every row per round).
    warmup : int
        Untimed rounds of every row on the first sample.
    max_new_tokens : int
        Generated tokens per run.
    memory : bool
        Run the peak-memory pass.
    progress : callable, optional
        Called with a short description after each run (for a progress bar).
    baseline : str
        Name of the row speedups are measured against.

    Returns
    -------
    BenchResult

    Raises
    ------
    ValueError
        For no samples, a batch larger than 1, no baseline row, or bad counts.
    """
    from himap_vlm.core.families import resolve_family

    if not samples:
        raise ValueError("the benchmark needs at least one sample")
    if repeats < 1 or warmup < 0 or max_new_tokens < 1:
        raise ValueError("repeats and max_new_tokens must be >= 1 and warmup >= 0")
    names = [r.name for r in rows]
    if baseline not in names:
        raise ValueError(f"the rows must include the baseline {baseline!r}; got {names}")
    for s in samples:
        if s["input_ids"].shape[0] != 1:
            raise ValueError("benchmark samples must each hold one prompt (batch size 1)")
    device = next(model.parameters()).device
    decoder = resolve_family(model).decoder(model)
    env_start = _environment(device)
    tick = progress or (lambda _msg: None)

    for w in range(warmup):
        for row in rows:
            measure_run(model, samples[0], row, max_new_tokens, decoder=decoder)
            tick(f"warm-up {w + 1}/{warmup} · {row.name}")

    measurements: list[Measurement] = []
    n_rows = len(rows)
    for r in range(repeats):
        for i, sample in enumerate(samples):
            shift = (r * len(samples) + i) % n_rows
            for row in list(rows[shift:]) + list(rows[:shift]):
                measurements.append(
                    measure_run(model, sample, row, max_new_tokens, sample=i, repeat=r, decoder=decoder)
                )
                tick(f"round {r + 1}/{repeats} · sample {i + 1}/{len(samples)} · {row.name}")

    mem: dict[str, list[int]] = {row.name: [] for row in rows}
    if memory:
        gc.collect()
        for i, sample in enumerate(samples):
            for row in rows:
                mem[row.name].append(measure_peak_memory(model, sample, row, max_new_tokens))
                tick(f"memory · sample {i + 1}/{len(samples)} · {row.name}")

    token_id = resolve_family(model).image_token_id(model.config)
    layouts: list[Layout] = [
        layout_from_inputs(s["input_ids"], token_id, s.get("attention_mask")) for s in samples
    ]
    flops_ratios: dict[str, float] = {}
    kv_predicted: dict[str, list[int]] = {}
    from himap_vlm.apps.flops import TextDims

    dims = TextDims.from_config(model.config)
    kv_dtype = next(model.parameters()).dtype
    for row in rows:
        per_sample = {}
        for m in measurements:
            if m.row == row.name and m.sample not in per_sample:
                per_sample[m.sample] = m.image_tokens_per_layer
        ratios = [flops_ratio_for_run(model, samples[i], counts) for i, counts in sorted(per_sample.items())]
        flops_ratios[row.name] = float(sum(ratios) / len(ratios)) if ratios else 1.0
        if row.style == "engine":
            kv_predicted[row.name] = [
                sum(kv_cache_bytes(dims, layouts[i], counts, dtype=kv_dtype))
                for i, counts in sorted(per_sample.items())
            ]
    summary = summarize(rows, measurements, mem, flops_ratios, baseline)
    env = {**env_start, "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    return BenchResult(
        model=_model_info(model),
        settings={
            "repeats": repeats,
            "warmup": warmup,
            "max_new_tokens": max_new_tokens,
            "samples": len(samples),
            "baseline": baseline,
            "memory_pass": memory,
            "image_tokens": layouts[0].image,
        },
        environment=env,
        layouts=[asdict(lay) for lay in layouts],
        rows=list(rows),
        measurements=measurements,
        memory=mem,
        summary=summary,
        kv_predicted_bytes=kv_predicted,
    )
