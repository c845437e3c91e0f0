"""Every figure of the app, built from engine results with plotly only (no module here imports Streamlit).

Functions take plain numbers (numpy arrays, lists, DataFrames) and return a ``plotly.graph_objects.Figure``
(or, for the per-token KL view, an HTML string). Pages decide what to compute; these modules decide how it
looks, so the same figure can be saved as HTML, shown in the app, or checked in a test.

Import a figure from the module that draws it (there is no re-export here):

* ``style``: what every figure shares: the template, palettes and fixed colours of the references and baselines
  (teacher, straight path, skip-k, affine), ``flow_colours``, ``_finish`` (title, height, margins, toolbar band),
  legend helpers, log-axis ticks, ``readable_label``, projection axis titles, ``to_html``;
* ``span``: the span heatmaps (recoupling ratio R, affine NMSE), their colour limits, and the skip-k bars;
* ``training``: training-loss and held-out NMSE curves, with smoothing;
* ``trajectories``: latent trajectories through a span in a 2-D projection;
* ``coupling``: crossing straight paths and the optimal matching of starts to targets;
* ``kl``: the per-token KL text (HTML), its colour legend and KL per position;
* ``compare``: flows and recipes compared (NMSE against blocks, recipe curves and error bars, KL against blocks);
* ``toy``: the teaching lab's animation of two learned 2-D flows.
"""
