"""jaxsae: sparse autoencoders on language-model activations, with the short KL+MSE fine-tune."""

__version__ = "0.1.0"


def load_sae(path):
    """Restores a trained SAE (run directory or checkpoint) for analysis; see `jaxsae.sae.load`."""
    from jaxsae.sae.load import load_sae as _load

    return _load(path)
