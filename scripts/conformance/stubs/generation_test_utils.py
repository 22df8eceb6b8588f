"""Stand-in for ``tests/generation/test_utils.py``, which transformers' source archive does not ship.

Written by himap's conformance runner (``scripts/conformance/run.py``) only when the archive lacks
the real module. ``tests/test_modeling_common.py`` imports ``GenerationTesterMixin`` from here;
this empty mixin lets it import. No generation test runs from it: the conformance report says so.
"""


class GenerationTesterMixin:
    """Empty: transformers' generation tests are not in the source archive."""

    HIMAP_STUB = True
