"""The learned transport layer and how it is trained: the velocity field u_θ (``field``), ``LatentFlow``
(normalisation + field + solver, ``latent``), integrators (``solvers``), the paths and losses (``losses``), the
training methods' registry (``methods``), the trainer (``training``), saved flows (``store``) and the 2-D
teaching lab (``toy``)."""
