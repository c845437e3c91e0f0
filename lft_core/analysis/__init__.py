"""What is measured about a span and its replacements: metrics (KL, NMSE, PPL), held-out evaluation against the
teacher, the baselines (skip-k, the closed-form affine map, …) and their registry, recoupling ratio and
crossings (``coupling``), trajectories and their 2-D projections, and the Compare page's tables."""
