"""Local dashboard over pipeline run directories: ``rlhf dashboard`` and ``rlhf report``.

- :mod:`rlhf.dashboard.data` reads run directories (pipeline.json, metrics/samples JSONL).
- :mod:`rlhf.dashboard.render` turns them into HTML pages with plotly charts.
- :mod:`rlhf.dashboard.server` serves the pages and a JSON API with the standard library.
- :mod:`rlhf.dashboard.cli` is the command line (``serve`` and ``report``).
"""
