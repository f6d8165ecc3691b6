"""ldm-recipes: a pipeline-orchestrated reproducibility benchmark for latent-diffusion training recipes."""

__version__ = "0.1.0"
