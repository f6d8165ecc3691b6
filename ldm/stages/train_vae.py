"""`ldm train-vae`: the embedded default's tiny AutoencoderKL, trained on the prepared images of both
resolutions (a scenario with `autoencoder.pretrained` skips this stage)."""
from __future__ import annotations

from pathlib import Path

from ..autoencoder import train_tiny_vae
from ..config import load_scenario
from ..data.prepared import open_prepared
from ..layout import data_key


def run(args) -> None:
    scenario = load_scenario(args.config)
    config, layout = scenario.config, scenario.layout
    # readers, not decoded arrays: training decodes the batches it draws (memory bounded whatever N is)
    images = [open_prepared(layout.prepared(data_key(config["resolutions"][k])))[0] for k in ("low", "high")]
    vcfg = config["autoencoder"]
    result = train_tiny_vae(images, Path(args.out), steps=vcfg["steps"], batch_size=vcfg["batch_size"],
                            lr=vcfg["lr"], seed=config["seed"])
    print(f"tiny VAE written to {args.out}: {result}")
