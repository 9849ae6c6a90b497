"""Data: image folders and digits, the autoencoders (SD-VAE, identity), the latent cache and its build stage."""
