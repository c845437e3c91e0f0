"""LFT Explorer engine: Latent Flow Transformers (Wu et al., 2025, arXiv 2505.14513).

Data flows one way: data -> model -> flow -> analysis -> run (and the app). No Streamlit in here; the CLI
(``python -m lft_core``) and the app call the same functions. One package per concept:

* ``data``: corpora -> token windows with a held-out split (``corpus``), the float16 activation cache
  (``activations``), texts saved on this server (``texts``);
* ``model``: model specs -> a Teacher (``loading``), the family table and all surgery (``teacher``: hidden
  states, Replace / Skip);
* ``flow``: the velocity field u_θ (``field``), ``LatentFlow`` (``latent``), integrators (``solvers``), the
  straight path and losses (``losses``), the training methods' registry (``methods``: SFM, FW, hybrid),
  ``TrainConfig`` (``config``), training pairs (``pairs``), the trainer (``training``), saved flows
  (``store``) and what their records must prove (``record``), the 2-D lab (``toy``);
* ``analysis``: KL / NLL / PPL / NMSE (``metrics``), held-out evaluation (``evaluation``), the baselines'
  registry (``baselines``: skip-k, affine) and the affine fit (``affine``), recoupling ratio (``recoupling``),
  crossings (``crossings``), ``trajectories``, ``projection`` (PCA / UMAP), recipes over seeds (``recipes``),
  the Compare page's tables (``comparison``);
* ``run``: the CLI (``cli``, ``commands``), background jobs (``jobs``), the demo (``demo``), ``sweep``,
  ``bench``, ``timings``;
* nouns and plumbing at the top: ``span`` (Span), ``errors`` (LFTError), ``registry`` (named things of one
  kind), ``atomic`` (every write), ``paths`` (the cache folder), ``distributed`` (the torchrun rank context).
"""
from lft_core.errors import LFTError

__all__ = ["LFTError"]
