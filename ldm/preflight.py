"""Checks of a scenario against the model code, before anything is computed: every run's model is built.

`ldm.config.validate` checks what the config alone says, and stays light (no torch) because the Snakefile
calls it for every DAG build. What only the model code knows (an architecture's sizes, its constructor
options, whether a stage's latent grid fits its patch size, text conditioning on a model that cannot take
it) is checked here by building each run's model on the meta device: no memory, no weights, and the same
code path (`ldm.recipe.build_run_model`) as training. It runs in `ldm validate-config` and once when a
Snakemake run starts (its `onstart`), so a bad recipe fails before prepare, the VAE and encode have run.
"""
from __future__ import annotations

import torch

from .autoencoder import tiny_vae_config
from .errors import ConfigError
from .spec import Scenario

#: Latent channels and downsampling of a pretrained VAE (SD-VAE, as in the paper); checked again at encode.
PRETRAINED_VAE = {"channels": 4, "factor": 8}
#: A placeholder width for caption states: the real one (the text encoder's) is known once encoded.
_TEXT_DIM = 8


def vae_geometry(config: dict) -> tuple[int, int]:
    """(latent channels, downsampling factor) of the scenario's autoencoder."""
    if config["autoencoder"]["pretrained"]:
        return PRETRAINED_VAE["channels"], PRETRAINED_VAE["factor"]
    tiny = tiny_vae_config()
    return tiny["latent_channels"], 2 ** (len(tiny["block_out_channels"]) - 1)


def check_models(scenario: Scenario) -> None:
    """Build every run's model on the meta device; the first problem as a ConfigError naming its field."""
    from .models import REGISTRY
    from .recipe import build_run_model

    channels, factor = vae_geometry(scenario.config)  # resolutions are multiples of 8 (the schema)
    for name, recipe in scenario.recipes.items():
        sizes = REGISTRY[recipe.arch].sizes
        if recipe.size not in sizes:
            raise ConfigError(f"recipes.{name}.size: {recipe.size!r} is not a size of {recipe.arch} "
                              f"(valid: {', '.join(sizes)})")
    for run in scenario.runs.values():
        latent = run.resolution // factor
        text_dim = _TEXT_DIM if scenario.recipe(run).text_conditional else None
        try:
            with torch.device("meta"):
                build_run_model(scenario, run, (channels, latent, latent), num_classes=2, text_dim=text_dim)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"recipes.{run.recipe} at stage {run.stage} ({run.resolution} px, latent "
                              f"{latent} x {latent}): {exc}") from None
