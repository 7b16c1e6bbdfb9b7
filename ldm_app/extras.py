"""Optional dependency groups: generation needs none of them; training needs `[train]` (datasets, TensorBoard)."""

from __future__ import annotations

import importlib.util

EXTRAS = {"train": ("datasets", "tensorboard")}  # extra → the modules it installs


def require_extra(extra: str) -> None:
    """A one-line ValueError that names the extra to install when one of its modules is missing."""
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not installed: this command needs ldm-app's [{extra}] extra; "
                         f"run pip install \"ldm-app[{extra}]\".")
