"""saelib: reproducible sparse-autoencoder interpretability experiments."""
