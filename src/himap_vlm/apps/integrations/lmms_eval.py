"""lmms-eval plugin: any supported model with any himap pruning method, as ``--model himap``.

::

    pip install "himap[lmms]"
    lmms-eval --model himap \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=himap,k1=2,r1=0.5,k2=8,r2=0.75 \\
        --tasks scienceqa_img,pope --batch_size 8
    accelerate launch --num_processes 4 -m lmms_eval --model himap --model_args ... --tasks ...

``model_args``: ``pretrained`` (local folder, named model such as ``tiny-llava``, or hub id),
``method`` (any registered method, default ``dense``), the method's parameters (``k1``, ``r1``,
``k``, ``r``, ``seed``, ...), and optionally ``dtype`` (``float32``, ``bfloat16``, ``float16``,
``auto``: the checkpoint's), ``attn_implementation``, ``device``, ``max_new_tokens`` (when a task
sets none; default 1024, as lmms-eval's models), ``batch_size``.

The method and its parameters are read by the one spec syntax of every himap command
(:mod:`himap_vlm.core.methods.spec`): ``method=himap,k1=2,r1=0.5`` is the configuration
``himap(k1=2,r1=0.5)``, values read as there, and parameters left out take the method's
``defaults_for(L)`` for the loaded model's depth ``L`` (the paper setting; scaled on models
that are not 32 layers deep), as ``himap eval`` does. From Python, ``method`` may also be a
whole configuration (``HimapEvalModel(..., method="himap(k1=2,r1=0.5)")``).

Registration
------------
lmms-eval (0.4 and later, registry v2) finds external models through the Python entry-point
group ``lmms_eval.models``; the payload is a ``ModelManifest`` or a callable returning one.
himap declares (``pyproject.toml``)::

    [project.entry-points."lmms_eval.models"]
    himap = "himap_vlm.apps.integrations.lmms_eval:manifest"

The manifest points lmms-eval at ``himap_vlm.apps.integrations.lmms_eval.HimapLMMS``, a subclass of
lmms-eval's ``lmms`` built on first access. Without the entry point, the (deprecated)
``LMMS_EVAL_PLUGINS=himap_vlm.apps.integrations`` route works too (:mod:`himap_vlm.apps.integrations.models`).

This module imports nothing from lmms-eval until ``manifest()`` or ``HimapLMMS`` is used, so
it imports fine without lmms-eval; :class:`HimapEvalModel` (the same model without the lmms-eval
base class) works on its own with any request object that has ``args`` as lmms-eval's
``Instance`` does.

Prompting
---------
lmms-eval hands the task's text (``doc_to_text``, instructions included) and the document's
images; the text goes into the user turn after one image entry per image, with the
processor's chat template when it has one, else LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``
(:func:`himap_vlm.apps.prompting.build_prompt`). Image placeholders already in the text are removed
first. Generation is greedy unless ``temperature > 0``; the output is cut at the first
``until`` string.

Scope: ``generate_until`` (what the HiMAP papers' benchmarks use). ``loglikelihood`` and
multi-round generation raise ``NotImplementedError``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

# ``HimapLMMS`` (built on first access, needs lmms-eval) is left out of ``__all__`` on purpose.
__all__ = ["CLASS_PATH", "MODEL_ID", "HimapEvalModel", "manifest"]

MODEL_ID = "himap"
CLASS_PATH = "himap_vlm.apps.integrations.lmms_eval.HimapLMMS"
_DTYPES = ("float32", "bfloat16", "float16", "auto")
MODEL_ARGS = frozenset(
    {"pretrained", "method", "batch_size", "max_batch_size", "device", "dtype", "attn_implementation", "max_new_tokens"}
)
"""``model_args`` keys that are the model's own; every other key is a parameter of the method."""
_log = logging.getLogger("himap.lmms_eval")


def manifest() -> Any:
    """The lmms-eval ``ModelManifest`` of the ``himap`` model (entry-point payload)."""
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError as exc:  # pragma: no cover - only called by lmms-eval itself
        raise ImportError(f"lmms-eval is not installed ({exc}); pip install 'himap[lmms]'") from exc
    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def _load_pretrained(pretrained: str, dtype: str, attn_implementation: str | None) -> tuple[Any, Any]:
    """``(model, processor)`` of a supported architecture, in eval mode (``trust_remote_code`` never)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from himap_vlm.core.families import resolve_family, supported_classes

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    config = AutoConfig.from_pretrained(pretrained)
    archs = list(getattr(config, "architectures", None) or [])
    names = [a for a in archs if a in supported_classes()]
    if not names:
        raise ValueError(
            f"{pretrained!r} is a {', '.join(archs) or type(config).__name__} model; himap supports: "
            f"{', '.join(supported_classes())}"
        )
    kwargs: dict[str, Any] = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = getattr(transformers, names[-1]).from_pretrained(pretrained, **kwargs)
    model.eval()
    resolve_family(model)
    return model, AutoProcessor.from_pretrained(pretrained)


def _stop_at(text: str, until: Sequence[str]) -> str:
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class HimapEvalModel:
    """An lmms-eval "simple" model that generates with a himap pruning method active.

    Parameters
    ----------
    pretrained : str
        Local model folder or hub id (a supported architecture).
    method : str
        A registered method name (``dense``, ``himap``, ``fastv``, ``random``, ``vtw``, ...) or a
        configuration in the spec syntax (``"himap(k1=2,r1=0.5)"``).
    batch_size : int
        Requests per ``generate`` call (left padding); lmms-eval passes its ``--batch_size``.
    device : str, optional
        ``cuda``, ``cuda:1``, ``cpu``; default: the process's GPU under ``accelerate launch``,
        else ``cuda`` if available, else ``cpu``.
    dtype : str
        ``float32``, ``bfloat16``, ``float16`` or ``auto``.
    attn_implementation : str, optional
        ``sdpa``, ``eager``, ``flash_attention_2``...
    max_new_tokens : int
        Used when a task's ``generation_kwargs`` give none.
    model : nn.Module, optional
        An already loaded model (with ``processor``) instead of ``pretrained``.
    processor : optional
        Its processor.
    **method_params
        The method's parameters (``k1=2, r1=0.5, ...``; those in ``method``'s parentheses win);
        left out: ``defaults_for(L)`` of the model's depth. lmms-eval's ``max_batch_size`` is ignored.

    Attributes
    ----------
    task_dict : dict
        ``task -> split -> doc_id -> document``; lmms-eval fills it before generating.
    image_tokens_per_layer, layouts : list
        Per request served so far: measured image tokens per decoder layer and the prompt
        layout ``[before, image, after]`` (for :meth:`flops_ratio`).

    Raises
    ------
    ValueError
        For an unknown method or parameter, a refused value, a configuration that does not fit
        the model, or an unsupported architecture.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "dense",
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        max_new_tokens: int = 1024,
        model: Any = None,
        processor: Any = None,
        **method_params: Any,
    ) -> None:
        super().__init__()
        import torch

        from himap_vlm.core.families import resolve_family
        from himap_vlm.core.methods.spec import MethodSpec

        method_params.pop("max_batch_size", None)
        given = MethodSpec.parse(str(method))  # the one spec syntax: NAME or NAME(KEY=VALUE,...)
        params = {**{k.replace("-", "_"): v for k, v in method_params.items()}, **given.params}
        MethodSpec(given.name, params)  # unknown parameters and refused values, before loading the model
        if not hasattr(self, "task_dict"):
            self.task_dict: dict[str, Any] = {}
        self._rank, self._world_size = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # data parallel under accelerate launch: lmms-eval shards the requests by rank and
            # gathers through ``self.accelerator``
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            default_device = self.accelerator.device
        else:
            default_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(device) if device else default_device
        if model is None:
            if pretrained is None:
                raise ValueError("pass pretrained=<model folder or hub id>")
            from himap_vlm.models import resolve_model

            model, processor = _load_pretrained(resolve_model(str(pretrained)), str(dtype), attn_implementation)
        elif processor is None:
            raise ValueError("pass processor= with model=")
        self._model = model.to(self._device)
        self.processor = processor
        self.pretrained = pretrained
        try:
            self.batch_size_per_gpu = max(1, int(batch_size))
        except (TypeError, ValueError):
            self.batch_size_per_gpu = 1  # "auto": lmms-eval's automatic batch size is not supported
        self.max_new_tokens = int(max_new_tokens)
        num_layers = int(resolve_family(self._model).text_config(self._model).num_hidden_layers)
        self.spec = MethodSpec(given.name, params, num_layers)  # defaults_for(L); checked against the depth
        self.spec.build()(self._model)  # refuse a configuration that does not fit before any request
        self.image_token_id = int(resolve_family(self._model).image_token_id(self._model.config))
        self.image_tokens_per_layer: list[list[int]] = []
        self.layouts: list[list[int]] = []

    # ------------------------------------------------------------------ lmms-eval properties
    @property
    def model(self) -> Any:
        """The transformers model."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def batch_size(self) -> int:
        """Requests per ``generate`` call."""
        return self.batch_size_per_gpu

    @property
    def device(self) -> Any:
        """The model's device."""
        return self._device

    @property
    def rank(self) -> int:
        """This process's rank (data parallel)."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of processes."""
        return self._world_size

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> HimapEvalModel:
        """Build from ``"pretrained=...,method=himap,k1=2"`` as lmms-eval does.

        The model's own arguments (:data:`MODEL_ARGS`) are taken as given; every other ``KEY=VALUE``
        is a parameter of ``method``, read by the spec syntax: ``method=himap,k1=2,r1=0.5`` is
        ``himap(k1=2,r1=0.5)``.

        Raises
        ------
        ValueError
            For an entry that is not ``KEY=VALUE``; :class:`~himap_vlm.core.methods.spec.MethodSpecError`
            for a method configuration that does not parse.
        """
        args: dict[str, Any] = {}
        method_pairs: list[str] = []
        for part in arg_string.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"model_args: expected KEY=VALUE entries separated by commas; got {part.strip()!r}")
            if key in MODEL_ARGS:
                args[key] = value.strip()
            else:
                method_pairs.append(f"{key}={value.strip()}")
        method = args.pop("method", "dense")
        if method_pairs:
            method = f"{method}({','.join(method_pairs)})"
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
        return cls(method=method, **args)

    # ------------------------------------------------------------------ requests
    def _document(self, task: str, split: str, doc_id: Any) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as exc:
            raise KeyError(
                f"document {doc_id!r} of task {task!r} split {split!r} is not in task_dict ({exc!r})"
            ) from None

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: Any) -> list[Any]:
        from PIL import Image

        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._document(task, split, doc_id)) or []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        flat: list[Any] = []
        for v in visuals:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        for v in flat:
            if not isinstance(v, Image.Image):
                raise ValueError(
                    f"himap's lmms-eval model takes images only; task {task!r} doc {doc_id!r} gave a "
                    f"{type(v).__name__} (video and audio are not supported)"
                )
        return [v.convert("RGB") if v.mode != "RGB" else v for v in flat]

    def _prompt(self, context: str, num_images: int) -> str:
        from himap_vlm.apps.prompting import build_prompt, image_token

        token = image_token(self.processor)
        text = context
        if token in text:
            text = "\n".join(line.strip() for line in text.replace(token, "").strip().splitlines())
        return build_prompt(self.processor, text, num_images)

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Generate an answer for each request (``args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``).

        Requests with the same generation settings are batched (longest prompts first); the
        results come back in request order.
        """
        import torch

        from himap_vlm.apps.prompting import to_model

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        prepared = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = tuple(req.args)[:6]
            gen = dict(gen_kwargs or {})
            until = gen.pop("until", None)
            if isinstance(until, str):
                until = [until]
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            prepared.append(
                (str(context), until or [], visuals, self._prompt(str(context), len(visuals)), gen)
            )
            groups[json.dumps(gen, sort_keys=True, default=str)].append(i)
        tokenizer = self.tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        with torch.inference_mode(), self.spec.build()(self._model) as run:
            for indices in groups.values():
                indices = sorted(indices, key=lambda j: -len(prepared[j][3]))
                gen = prepared[indices[0]][4]
                kwargs = self._generation_kwargs(gen, pad)
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    texts = [prepared[j][3] for j in chunk]
                    images = [prepared[j][2] for j in chunk]
                    inputs = self._encode(texts, images)
                    inputs = to_model(inputs, self._model)
                    out = self._model.generate(**inputs, **kwargs)
                    length = inputs["input_ids"].shape[1]
                    decoded = self.processor.batch_decode(out[:, length:], skip_special_tokens=True)
                    self._record(run, inputs)
                    for j, text in zip(chunk, decoded, strict=True):
                        context, until = prepared[j][0], prepared[j][1]
                        answer = _stop_at(text, until).strip()
                        results[j] = answer
                        hook = getattr(self, "cache_hook", None)
                        if hook is not None:
                            hook.add_partial("generate_until", (context, prepared[j][4]), answer)
        ratio = self.flops_ratio()
        if ratio is not None:
            _log.info(
                "himap %s: %d requests so far, prefill FLOPs ratio (exact) %.3f",
                self.spec.label,
                len(self.layouts),
                ratio,
            )
        return [r if r is not None else "" for r in results]

    def _generation_kwargs(self, gen: dict[str, Any], pad: int | None) -> dict[str, Any]:
        temperature = float(gen.get("temperature", 0) or 0)
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(gen.get("max_new_tokens", self.max_new_tokens)),
            "num_beams": int(gen.get("num_beams", 1) or 1),
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            kwargs["temperature"] = temperature
            if gen.get("top_p") is not None:
                kwargs["top_p"] = float(gen["top_p"])
        if pad is not None:
            kwargs["pad_token_id"] = pad
        return kwargs

    def _encode(self, texts: list[str], images: list[list[Any]]) -> Any:
        tokenizer = self.tokenizer
        previous = getattr(tokenizer, "padding_side", None)
        tokenizer.padding_side = "left"
        try:
            kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
            if any(images):
                kwargs["images"] = images
            return self.processor(**kwargs)
        finally:
            if previous is not None:
                tokenizer.padding_side = previous

    def _record(self, run: Any, inputs: Any) -> None:
        from himap_vlm.apps.eval.runner import prompt_layouts

        mask = inputs.get("attention_mask")
        layouts = prompt_layouts(
            inputs["input_ids"].cpu(), None if mask is None else mask.cpu(), self.image_token_id
        )
        for b, layout in enumerate(layouts):
            self.layouts.append(layout)
            self.image_tokens_per_layer.append([int(row[b]) for row in run.image_tokens_per_layer])

    def flops_ratio(self, convention: str = "exact") -> float | None:
        """Prefill FLOPs relative to dense over the requests served so far (``exact`` or ``paper``)."""
        import dataclasses

        from himap_vlm.apps.eval.runner import flops_ratios
        from himap_vlm.apps.flops import TextDims

        if not self.layouts:
            return None
        try:
            dims = dataclasses.asdict(TextDims.from_config(self._model.config))
        except ValueError:
            return None
        records = [
            {"layout": lay, "image_tokens_per_layer": counts}
            for lay, counts in zip(self.layouts, self.image_tokens_per_layer, strict=True)
        ]
        exact, paper = flops_ratios(records, dims)
        return exact if convention == "exact" else paper

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """Not supported: pruning would score the continuation as part of the instruction."""
        raise NotImplementedError(
            "himap's lmms-eval model implements generate_until only; loglikelihood (multiple_choice "
            "output_type) tasks are not supported"
        )

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        """Not supported."""
        raise NotImplementedError("himap's lmms-eval model does not implement multi-round generation")


_LMMS_CLASS: type | None = None


def _lmms_class() -> type:
    global _LMMS_CLASS
    if _LMMS_CLASS is None:
        try:
            from lmms_eval.api.model import lmms
        except ImportError as exc:
            raise ImportError(
                f"HimapLMMS needs lmms-eval ({exc}); pip install 'himap[lmms]', or use HimapEvalModel"
            ) from exc

        class HimapLMMS(HimapEvalModel, lmms):  # type: ignore[misc, valid-type]
            """:class:`HimapEvalModel` as an lmms-eval ``lmms`` (what ``--model himap`` loads)."""

            is_simple = True

        HimapLMMS.__module__ = __name__
        HimapLMMS.__qualname__ = "HimapLMMS"
        _LMMS_CLASS = HimapLMMS
    return _LMMS_CLASS


def __getattr__(name: str) -> Any:
    if name == "HimapLMMS":
        return _lmms_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
