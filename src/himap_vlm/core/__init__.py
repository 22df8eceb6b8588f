"""The library core: the engine that drops tokens, the methods that choose them, the model families.

Nothing in here imports from :mod:`himap_vlm.apps` (applications) or :mod:`himap_vlm.models`
(model builders); everything himap reads from transformers internals goes through
:mod:`himap_vlm.core.contract`.
"""
