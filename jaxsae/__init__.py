"""jaxsae: sparse autoencoders on language-model activations, with the short KL+MSE fine-tune."""

__version__ = "0.1.0"


def load_sae(path, name=None):
    """Restores a trained SAE (run directory or checkpoint) for analysis; a sweep's by its member `name`
    (e.g. "k16-s0"); see `jaxsae.sae.load`."""
    from jaxsae.sae.load import load_sae as _load

    return _load(path, name)
