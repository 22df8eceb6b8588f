"""``himap demo``: every pruning method on the embedded tiny LLaVA, accuracy next to cost, in minutes.

What it does
------------
1. Generates ``n`` held-out questions in memory: the ``test`` split of the synthetic scene-QA
   benchmark (:func:`himap_vlm.apps.data.synthetic.load_synthetic`), drawn at the model's vision image size
   (no test scene is ever trained on: splits are content-disjoint). Each question is sent as the
   model was trained to read it (see *Prompts*), in the processor's chat template.
2. Evaluates dense and every configuration (see *Configurations*) on those questions through
   the evaluation runner of ``himap eval`` (:func:`himap_vlm.apps.eval.runner.evaluate`, task
   ``synthetic``: the questions and prompts of ``himap eval --task synthetic``): accuracy overall
   and per question family, and the prefill FLOPs ratio (exact convention: every token, real
   shapes, from the image tokens each layer really processed, summed over the questions).
3. Times the language-model prefill of every configuration in the same process with the
   paired, interleaved timing of ``himap bench`` (:func:`himap_vlm.apps.bench.runner.run_benchmark`):
   batch size 1, a few questions, after a warm-up round; the speedup is the median over
   (question, round) of dense's prefill time over the configuration's, each pair measured
   back to back.
4. Prints a table and writes ``OUT/demo.json`` (everything, raw timings included) and
   ``OUT/demo.png`` (accuracy against FLOPs ratio, one series per method, dense marked).
   The runner's per-configuration predictions are under ``OUT/eval/synthetic/<model>/``; the
   demo recomputes everything on every run and replaces that folder.

The command (``himap demo``) runs models under 100 M parameters on one CPU thread unless
``--threads`` says otherwise: their many small kernels gain nothing from more threads, and on a
busy machine a descheduled thread stalls every kernel. :func:`run_demo` leaves the thread count
to the caller.

Configurations
--------------
Read from the method registry (:mod:`himap_vlm.apps.demo.configs`): every registered method,
in :func:`~himap_vlm.core.methods.method_names` order, at ``defaults_for(L)`` -- its paper
setting scaled to the model depth ``L`` (``L = 8`` for the embedded model), marked ``*`` -- plus
each of its ``budgets(L)``, harsher settings (on a small model whose objects each cover many
redundant image tokens, moderate pruning costs little, so the budgets go where the methods
separate). Dense always runs, first. A method file added to :mod:`himap_vlm.core.methods`
appears here with no edit. The rule is printed under the table and recorded in ``demo.json``
(``settings.rule``), generated from each method's ``defaults_for`` / ``budgets`` and the full
labels of the resulting configurations.

``--methods`` takes the one spec syntax of ``himap eval`` (:mod:`himap_vlm.core.methods.spec`):
a name alone runs its ``defaults_for(L)`` and budgets; ``fastv(k=2,r=0.9)`` runs that
configuration only (parameters left out: ``defaults_for(L)``). Budgets that do not fit the
model's depth are skipped (and listed in ``demo.json``); a configuration given that does not
fit is an error. VisiPruner's thresholds are scale-dependent: on a small model it may prune
nothing, which the table then shows.

Prompts
-------
The questions are asked as ``himap eval --task synthetic`` asks them
(:mod:`himap_vlm.apps.eval.prompts`): the embedded model's tokenizer cannot spell the task's
short-answer instruction, so it gets the questions as it was trained on them (multiple-choice
questions carry their own "Answer with the option's letter ..." line).

Example::

    from himap_vlm.apps.demo import run_demo
    from himap_vlm.models.tiny_llava import load_trained
    from himap_vlm.assets import tiny_llava_path

    model, processor = load_trained(tiny_llava_path())
    result = run_demo(model, processor, "himap-demo", n=300, progress=True)
    result.print()
"""

from __future__ import annotations

from .configs import DemoConfig, configuration_rule, demo_configurations
from .plot import plot_demo
from .results import DemoResult, DemoRow
from .run import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_N,
    DEFAULT_TIMING_REPEATS,
    DEFAULT_TIMING_SAMPLES,
    run_demo,
    synthetic_samples,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_N",
    "DEFAULT_TIMING_REPEATS",
    "DEFAULT_TIMING_SAMPLES",
    "DemoConfig",
    "DemoResult",
    "DemoRow",
    "configuration_rule",
    "demo_configurations",
    "plot_demo",
    "run_demo",
    "synthetic_samples",
]
