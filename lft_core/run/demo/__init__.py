"""The demo, in one command: everything the pages need for a ready-made story, built once.

``prepare_demo`` runs the demo's steps, a list of step objects built in one place from the settings
(``demo_steps`` in ``steps.py``); with the default two methods, seven steps:

1. ``CacheStep``: cache every layer h_0 … h_L of ``windows`` × ``seq_len`` training tokens, and of the held-out
   windows the affine grid is scored on (the entries the Span page and the analysis pages read);
2. ``RecouplingGridStep``: the recoupling grid of every span from that cache (``recoupling.recoupling_grid_cached``:
   persisted, so the Span page reads it instead of recomputing);
3. ``AffineGridStep``: the affine grid of every span (``affine.affine_grid_from_caches``, persisted likewise);
   then, among the spans of ``blocks`` blocks, the one with the lowest recoupling ratio R and the one with the
   highest are chosen (see ``choose_spans``);
4-7. one ``FlowStep`` per (which span, method) of ``flow_plan``: a flow trained with the default recipe for each
   method on each of the two spans: ``demo-sfm-M-N``, ``demo-fw-M-N`` (a ``-<tag>`` suffix names flows of other
   settings).

Each step has a label (given the settings and the chosen spans), a state from the manifest and the artefacts
themselves, a ``run`` (with a progress callback and a stop check) and, for the cache and the grids, a
``read_back`` of the result done before. The manifest's step records, ``DemoSettings.total``, ``step_labels``,
``demo_status``, the ETA estimates and ``DemoResult`` all read that one list: a step is added or reordered there.

The manifest ``cache/demo/manifest.json`` (written atomically, only by the process that holds the demo's lock)
records the settings, the cache entries, the grids, the chosen spans with why, the flows, and every step's state
and seconds. ``demo_status`` reads it and checks the artefacts themselves (cache entry complete, grid file
there and of this build of the entry, flow complete and of these settings), so deleting any of them makes the
demo not ready again; it loads no model and hashes nothing, so every page can call it.

Idempotent: a run whose steps are all done returns at once without loading the model. Resumable: caches and
grids are written atomically (a killed step just runs again), a killed or stopped trainer leaves a checkpoint
that the next run resumes (``train_flow(..., resume=True)``). One preparation at a time across processes (a file
lock, ``cache/demo/prepare.lock``): a second ``prepare_demo`` is refused with one LFTError line naming the job
or process that holds it. Saved data is never overwritten: a flow of the demo's name trained with other settings
is refused, not replaced.

Modules: ``settings`` (DemoSettings, flow_plan, choose_spans), ``steps`` (the step classes, ``demo_steps``, the
artefact checks), ``status`` (the manifest, lock and owner files, DemoStatus, demo_status), ``prepare``
(prepare_demo, DemoResult, the run). Importing the package loads no torch.
"""
from __future__ import annotations

from lft_core.run.demo.prepare import PROGRESS_EVERY_S, DemoResult, Progress, prepare_demo
from lft_core.run.demo.settings import DEFAULT_MODEL, FIRST_BLOCK, MAX_PAIRS, DemoSettings, choose_spans, flow_plan
from lft_core.run.demo.status import (LOCK_WAIT_S, MANIFEST_VERSION, DemoStatus, demo_dir, demo_status,
                                      manifest_path, read_manifest)
from lft_core.run.demo.steps import (AffineGridStep, CacheStep, FlowStep, RecouplingGridStep, Step, demo_steps,
                                     step_labels)

__all__ = [
    "DEFAULT_MODEL", "FIRST_BLOCK", "LOCK_WAIT_S", "MANIFEST_VERSION", "MAX_PAIRS", "PROGRESS_EVERY_S",
    "AffineGridStep", "CacheStep", "DemoResult", "DemoSettings", "DemoStatus", "FlowStep", "Progress",
    "RecouplingGridStep", "Step", "choose_spans", "demo_dir", "demo_status", "demo_steps", "flow_plan",
    "manifest_path", "prepare_demo", "read_manifest", "step_labels",
]
