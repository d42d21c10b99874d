"""The small GPT-NeoX that jaxsae ships (trained on the Python standard library; see its README)."""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).parent.parent / "assets" / "pythia-stdlib"


def resolve_model_path(path: str) -> str:
    """A config's model.path: "shipped" names the shipped model, anything else is kept."""
    return str(SHIPPED) if path == "shipped" else path
