"""vramfit: run FLUX-class diffusion transformers inside any GPU-memory budget, measured honestly."""

__version__ = "0.1.0"
