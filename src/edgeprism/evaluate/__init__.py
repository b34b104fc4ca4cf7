"""Task fidelity of a codec on the real distributed path (docs/ARCHITECTURE.md, docs/CODECS.md).

- `fidelity`: run `partition.transform.PositionWise` over a loopback group and score it against the
  single-device reference (`evaluate`, `run_distributed`, the metric functions).
- `eval_sets`: the evaluation set of each model (real weights and data from `edgeprism.assets`, all offline).

This room sits below `profile/` (which stores fidelity in the profile), `calibrate/` and `cli/`, and
above `partition/`, `comm/` and `assets/`. Nothing is imported here: `import edgeprism.evaluate.fidelity` etc.
"""
