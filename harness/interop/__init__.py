"""Interoperability: diffusers and official DiT weights in and out, train.init_from."""
