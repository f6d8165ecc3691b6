"""A run's recipe made concrete: its model, its objective, and the conditioning inputs of a batch.

Training and sampling both build what a recipe means here, so the two can never disagree on it: which
constructor keywords a recipe turns into, the stage's schedule shift, how a cached batch becomes latents
and model keywords (flip + mirrored crop, condition dropout, caption padding).
"""
from __future__ import annotations

import torch

from .control import FLIP, mirror_flipped
from .diffusion import build_objective
from .errors import ConfigError
from .data.latent_cache import sample_latents
from .models import build_model
from .models.conditioning import drop_conditions
from .spec import Recipe, Run, Scenario
from .text import pad_tokens


def build_run_model(scenario: Scenario, run: Run, latent_shape, num_classes: int, text_dim: int | None = None):
    """The run's architecture at its latent size (MODEL CONTRACT in `ldm.models`).

    Recipe keys reach the model only when they differ from the contract's defaults, so configs and
    checkpoints made before those keys existed build the same model. `text_dim` (the cache's text state
    width) is required for text conditioning. learn_sigma stays off unless `options` turns it on (then the
    ddpm objective trains the sigma head through its VLB term).
    """
    recipe = scenario.recipe(run)
    kwargs = {"control_mode": recipe.control if recipe.uses_control else None, "learn_sigma": False,
              "class_dropout_prob": recipe.class_dropout, "control_dropout_prob": recipe.control_dropout}
    if recipe.semantic is not None:
        kwargs["semantic"] = recipe.semantic
    for key in ("qk_norm", "gradient_checkpointing"):
        if getattr(recipe, key):
            kwargs[key] = True
    for key in ("control_exponents", "control_offsets"):
        if getattr(recipe, key):
            kwargs[key] = dict(getattr(recipe, key))
    if recipe.text_conditional:
        if text_dim is None:
            raise ConfigError(f"run {run.run_id}: recipe {run.recipe!r} is text-conditional but the latent cache "
                              "has no text states (encode it with a text_encoder)")
        kwargs["text_dim"] = int(text_dim)
    kwargs.update(recipe.options or {})
    return build_model(recipe.arch, recipe.size, latent_size=latent_shape[-1], in_channels=latent_shape[0],
                       num_classes=num_classes, **kwargs)


def build_run_objective(scenario: Scenario, run: Run):
    """The recipe's objective with the stage's resolution-dependent schedule shift."""
    recipe = scenario.recipe(run)
    shift = scenario.schedule_shift(run)
    if recipe.objective == "rectified_flow":
        return build_objective(recipe.objective, shift=shift)
    return build_objective(recipe.objective, resolution_shift=shift, beta_schedule=recipe.beta_schedule or "linear")


def pad_captions(recipe: Recipe, states: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator):
    """Caption token states padded as the recipe says; the attention mask only where the recipe masks."""
    text, mask = pad_tokens(states.float(), lengths, mode=recipe.text_padding, sigma=recipe.text_pad_sigma,
                            generator=generator)
    return text, (mask if recipe.text_padding == "zero_mask" else None)


def training_inputs(recipe: Recipe, batch: dict, generator: torch.Generator, num_classes: int,
                    scaling_factor: float, shift_factor: float, uses_control: bool):
    """Latents x0 and model keywords of a cached batch, drawing in a fixed order from `generator`: flips +
    posterior noise, condition dropout, caption padding. The draws happen whatever the recipe's control
    setting, so two recipes that differ only in it see the same batches."""
    x0, flipped = sample_latents(batch, generator=generator, scaling_factor=scaling_factor, shift_factor=shift_factor)
    control = mirror_flipped(batch["control"].float(), flipped)
    if recipe.control_flip is False:  # the ablation: the model is never told that an image was mirrored
        control[:, FLIP] = 0.0
    labels, control_keep = drop_conditions(batch["label"].long(), num_classes=num_classes,
                                           class_dropout_prob=recipe.class_dropout,
                                           control_dropout_prob=recipe.control_dropout, generator=generator)
    kwargs = {"control": control, "control_keep": control_keep} if uses_control else {}
    if recipe.text_conditional:
        text, text_mask = pad_captions(recipe, batch["text_emb"], batch["text_len"], generator)
        kwargs.update(text=text, text_keep=(labels != num_classes).float())  # the class dropout draw
        if text_mask is not None:
            kwargs["text_mask"] = text_mask
    else:
        kwargs["class_labels"] = labels
    return x0, kwargs


def validation_inputs(recipe: Recipe, batch: dict, num_classes: int, scaling_factor: float, shift_factor: float,
                      uses_control: bool, pad_generator: torch.Generator):
    """Latents x0 and model keywords of held-out rows as a fully conditioned model sees them: the posterior
    mean of the unflipped crop (no posterior noise), its own control, no condition dropout; caption padding
    noise (noisy_replicate) from `pad_generator`, which the caller seeds per row."""
    x0 = (batch["mean"].float() - shift_factor) * scaling_factor
    n = x0.shape[0]
    kwargs = {"control": batch["control"].float(), "control_keep": torch.ones(n)} if uses_control else {}
    if recipe.text_conditional:
        text, text_mask = pad_captions(recipe, batch["text_emb"], batch["text_len"], pad_generator)
        kwargs.update(text=text, text_keep=torch.ones(n))
        if text_mask is not None:
            kwargs["text_mask"] = text_mask
    else:
        kwargs["class_labels"] = batch["label"].long()
    return x0, kwargs
