"""Explicit, version-pinned patches to third-party internals (never applied at import time)."""

from __future__ import annotations

import warnings


def warn_if_untested(distribution: str, tested: tuple[str, ...], patcher: str) -> None:
    """Patches target specific upstream versions; say so when another one is installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version(distribution)
    except PackageNotFoundError:
        return
    if found not in tested:
        warnings.warn(f"{patcher} was tested with {distribution} {tested}, found {found}")
