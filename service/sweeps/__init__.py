"""Sweeps: one request that trains a grid of job specs over seeds and reports the metric.

- ``grid``: the request model, grid expansion, dotted overrides, the linear LR scaling rule;
- ``ops``: submit (every cell checked), release runs under the concurrency limit, cancel,
  delete, the sweep's status;
- ``report``: per-cell final/best metric, mean and sample std over seeds, CSV;
- ``figure``: the metric against the numeric axis (matplotlib, SVG/PNG);
- ``releaser``: the API's loop that releases runs as children finish.
"""
