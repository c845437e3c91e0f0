"""Text and hidden states: corpora -> token windows with a held-out split (``corpus``; the shipped corpus files
live beside it), the on-disk activation cache (``activations``), texts users saved on this server (``texts``)."""
