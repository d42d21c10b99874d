"""jaxsae: sparse autoencoders on language-model activations, with the short KL+MSE fine-tune."""

__version__ = "0.1.0"
