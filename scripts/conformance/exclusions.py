"""The reviewed lists of the conformance run: what may fail with himap installed, and why.

Two lists, both keyed by the name of a ``test_*`` function of ``ModelTesterMixin`` in
``tests/test_modeling_common.py`` of the transformers release in :data:`WRITTEN_FOR` (a
``parameterized`` variant ``test_x_03_fp32_...`` counts as ``test_x``):

:data:`BY_DEFINITION`
    Tests that cannot hold once image tokens are really dropped (they assert a per-layer length
    equal to the input, or equality with an unpruned reference). A regression that matches one is
    reported with its reason and does not fail the run. Never add a test here to hide a bug.
:data:`KNOWN_ENGINE_BUGS`
    Regressions caused by engine bugs that are reported and being fixed in the engine. They are
    always shown as regressions; they fail the run unless ``--allow-known-bugs`` is given (as
    ``.ci/run`` does), and an entry that no longer matches any regression fails the run
    (strict: delete the entry with the fix).

``tests/conformance/test_conformance_lists.py`` checks that every name still exists in the
archive of :data:`WRITTEN_FOR`; ``run.py`` reports names missing from the installed release's
archive as stale.
"""

from __future__ import annotations

from dataclasses import dataclass

WRITTEN_FOR = "5.24.0"
"""transformers release whose ``tests/test_modeling_common.py`` these lists were written against."""


@dataclass(frozen=True)
class Entry:
    """One reviewed entry.

    Attributes
    ----------
    test : str
        A ``test_*`` function of ``ModelTesterMixin``.
    modes : tuple of str
        Modes it applies to (``"noop"``, ``"prune"``).
    reason : str
        One line: why it cannot hold (or which engine bug breaks it).
    families : tuple of str
        Test classes (``LlavaConformanceTest``, ...) it applies to; empty = every family.
    """

    test: str
    modes: tuple[str, ...]
    reason: str
    families: tuple[str, ...] = ()

    def matches(self, mode: str, test_class: str, base_name: str) -> bool:
        return mode in self.modes and base_name == self.test and (not self.families or test_class in self.families)


BY_DEFINITION: tuple[Entry, ...] = ()
"""Empty on transformers 5.24.0: with k >= 1 every mixin test that passes unpruned also holds
after real pruning except those broken by the engine bugs below. The mixin's shape checks read
only layer 0 (never pruned) and its equality checks compare two runs that prune alike; its
equality checks against an unpruned reference (``test_inputs_embeds_matches_input_ids``) run only
on the bare ``*Model`` classes, which himap does not support."""

KNOWN_ENGINE_BUGS: tuple[Entry, ...] = ()
"""Empty: the two engine bugs of issue 19 (a deep copy inside a ``with`` block that did not prune,
and kernel-dependent filler/padding slots in returned hidden states) are fixed, and with them the
250 ``test_eager_matches_sdpa_inference`` regressions of ``prune`` mode."""
