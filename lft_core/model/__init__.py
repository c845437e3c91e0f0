"""The teacher: loading a causal LM from a spec (``loading``) and everything that knows a model family's
attribute names (``teacher``: hidden states, logits, the Replace / Skip surgery)."""
