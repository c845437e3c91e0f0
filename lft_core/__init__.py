"""LFT Explorer engine: Latent Flow Transformers (Wu et al., 2025, arXiv 2505.14513).

Data flows one way: corpus -> teacher -> activations -> training -> flow -> metrics/projection.
No Streamlit in here; the CLI (``python -m lft_core``) and the app call the same functions.
"""
from .errors import LFTError

__all__ = ["LFTError"]
