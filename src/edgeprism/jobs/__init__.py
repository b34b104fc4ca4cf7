"""Jobs that drive the serving path end to end on one or more devices.

- `validate`: cost-model validation — the profile's predictions (`plan.cost.predict`) against fresh runs
  through `runtime.batch_worker` at points the profile did not sample.
- `validate_worker`: the process entry point those runs use on every device.

This room sits above `runtime/` and `plan/` (it uses both) so that `profile/` below them stays plain
measurement (docs/ARCHITECTURE.md). Nothing is imported here: `import edgeprism.jobs.validate` etc.
"""
