"""Compression-aware calibration for the project's own small models (docs/CALIBRATION.md).

- `emulate`: the position-wise exchange in one process, differentiable (same per-block math as
  `partition.transform.PositionWise`, straight-through gradients for quantising codecs).
- `train`: fine-tune with the codec in the loop (full, or a light LayerNorm + bias correction).
- `tasks`: the models it knows, with disjoint calibration and evaluation data.
- `runner`: evaluate through the real distributed path, calibrate, evaluate again, save.
- `checkpoint`: write a Hugging Face-format checkpoint that `--checkpoint` loads.

Nothing is imported here: `import edgeprism.calibrate.emulate` etc.
"""
