"""``himap_vlm.apps.integrations.models.himap.HimapLMMS``: where ``LMMS_EVAL_PLUGINS`` looks for the model."""

from __future__ import annotations

from himap_vlm.apps.integrations.lmms_eval import _lmms_class

HimapLMMS = _lmms_class()

__all__ = ["HimapLMMS"]
