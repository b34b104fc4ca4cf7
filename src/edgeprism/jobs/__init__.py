"""Jobs that drive the serving path end to end on one or more devices.

- `validate`: cost-model validation — the profile's predictions (`plan.cost.predict`) against fresh runs
  through `runtime.batch` at points the profile did not sample, as one job (`validate_rank`, its rank
  function, runs on every device).

This room sits above `runtime/` and `plan/` (it uses both) so that `profile/` below them stays plain
measurement (docs/ARCHITECTURE.md). Nothing is imported here: `import edgeprism.jobs.validate` etc.
"""
