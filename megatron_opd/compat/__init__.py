"""Explicit, version-pinned patches to third-party internals (never applied at import time)."""
