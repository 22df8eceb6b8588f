"""The deprecated ``LMMS_EVAL_PLUGINS`` route of lmms-eval: ``LMMS_EVAL_PLUGINS=himap_vlm.apps.integrations``.

lmms-eval imports ``<plugin>.models``, reads :data:`AVAILABLE_MODELS` (model name -> class name)
and loads ``<plugin>.models.<model name>.<class name>``. Prefer the entry point (see
:mod:`himap_vlm.apps.integrations.lmms_eval`).
"""

from __future__ import annotations

AVAILABLE_MODELS = {"himap": "HimapLMMS"}
