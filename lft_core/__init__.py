"""LFT Explorer engine: Latent Flow Transformers (Wu et al., 2025, arXiv 2505.14513).

Data flows one way: corpus -> teacher -> activations -> training -> flow -> metrics/projection.
No Streamlit in here; the CLI (``python -m lft_core``) and the app call the same functions.

One module per concept:

* nouns: ``span`` (Span, the blocks m … n−1), ``errors`` (LFTError);
* the model: ``loading`` (model specs -> a Teacher), ``teacher`` (the family table and all surgery: hidden
  states, Replace / Skip);
* the data: ``corpus`` (text -> token windows, train / held-out split), ``activations`` (the float16 cache);
* the flow: ``field`` (the velocity field u_θ), ``flow`` (LatentFlow: normalisation + field + solver),
  ``solvers`` (Euler, midpoint), ``losses`` (SFM, Flow Walking, hybrid; the straight path);
* runs: ``training`` (TrainConfig, train_flow), ``store`` (saved flows: save, load, list, lock, delete),
  ``jobs`` (background CLI processes), ``bench``;
* analysis: ``metrics`` (KL, NLL, PPL, NMSE), ``evaluation`` (vs skip-k), ``baselines`` (the closed-form
  affine replacement of a span, and its grid), ``coupling`` (recoupling ratio,
  crossings), ``trajectories``, ``projection`` (PCA / UMAP), ``toy`` (the 2-D lab);
* plumbing: ``atomic`` (every write), ``paths`` (the cache folder), ``cli``.
"""
from lft_core.errors import LFTError

__all__ = ["LFTError"]
