"""Training: the MSE phase over the activation store (and, later, the KL+MSE fine-tune)."""
