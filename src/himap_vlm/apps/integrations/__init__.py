"""Integrations with other evaluation frameworks (each imported only when that framework is used).

* :mod:`himap_vlm.apps.integrations.lmms_eval`: the ``himap`` model of `lmms-eval`
  (``lmms-eval --model himap --model_args pretrained=...,method=himap,k1=2,r1=0.5,k2=8,r2=0.75``).
"""
