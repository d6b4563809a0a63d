"""What producers (the platform) and consumers (the analysis) share, and nothing else.

- `mask`: the mask artifact format ``rlsparsity.mask/1``: its writer, the one reader and
  its verification;
- `mlflow_layout`: run kinds, tags, artifact paths and metric names;
- `layers`: the one grouping of state-dict keys into layers and matrix types.

This package imports neither torch nor Ray (import-linter checks it), so any process,
the analysis job's tasks included, can read the platform's outputs.
"""
