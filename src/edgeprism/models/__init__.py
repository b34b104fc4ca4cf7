"""Reference models, runnable alone. Importing any of them registers the built-in families
(`models/families.py`) so that `get_family(config.family)` answers for vit, bert and gpt2."""

from edgeprism.models import families as _families  # noqa: F401  (registers vit, bert, gpt2)
