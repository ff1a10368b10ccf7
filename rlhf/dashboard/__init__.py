"""Local dashboard over pipeline run directories: ``rlhf dashboard`` and ``rlhf report``.

- :mod:`rlhf.dashboard.data` reads run directories (pipeline.json, metrics/samples JSONL) and
  derives the run summary (SFT vs trained policies) and the second x-axis (episodes, epochs).
- :mod:`rlhf.dashboard.metrics` knows what a metric key means: its label, its section, its
  standard-error band, whether it is a constant; and the smoothing the page applies.
- :mod:`rlhf.dashboard.lineage` draws the run's registry lineage as an SVG graph.
- :mod:`rlhf.dashboard.render` turns all of it into HTML pages with plotly charts.
- :mod:`rlhf.dashboard.server` serves the pages and a JSON API with the standard library.
- :mod:`rlhf.dashboard.cli` is the command line (``serve`` and ``report``).
"""
