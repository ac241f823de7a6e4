"""stablenets: exact non-expansive and averaged networks (Sherry et al., Physica D 2024)."""

from __future__ import annotations

from typing import Any

__all__ = ["build_model", "load_model", "save_model"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``build_model``, ``load_model``, ``save_model`` from ``stablenets.nn.models``, imported on first use:
    ``python -m stablenets table|figure|summary`` never imports torch (``stablenets.pipeline.reports``)."""
    if name in __all__:
        from stablenets.nn import models

        return getattr(models, name)
    raise AttributeError(f"module 'stablenets' has no attribute {name!r}")
