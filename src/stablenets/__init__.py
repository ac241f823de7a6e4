"""stablenets: exact non-expansive and averaged networks (Sherry et al., Physica D 2024)."""

from .models import build_model, load_model, save_model

__all__ = ["build_model", "load_model", "save_model"]
__version__ = "0.1.0"
