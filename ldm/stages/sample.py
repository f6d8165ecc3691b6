"""`ldm sample`: images from every snapshot of a run, for every sampling seed, with fixed conditions.

The final snapshot is sampled with every seed of `sampling.seeds` (its metrics are mean ± std over them);
earlier snapshots, which only feed the metric-vs-step curves, with the first seed. Labels are
class-balanced (image i gets class i mod K) and every image has its own noise seed derived from
(sampling seed, i), so image i is the same whatever the batch size. The size/crop condition is that of an
uncropped square image of `sampling.original_size` pixels (the SDXL convention for "a whole image").
Images are stored by `ldm.samples`, one shard per snapshot.

Two extra sets of the final snapshot, when the config asks for them:
- `guidance.safetensors`: the first seed at every semantic scale of `sampling.guidance_sweep` (the sweep
  curve; evaluation picks the scale with the best fd_evaluator);
- `guidance_joint.safetensors` (`sampling.guidance_sweep_joint`, recipes with control): the same sweep with
  one joint scale on both conditions, the single-scale guidance that two-scale guidance is compared with;
- `sizes.safetensors`: every seed at every original size of `sampling.size_conditions`, same noise and
  class per image across sizes (the size-consistency metric, the paper's Figure 2 effect).
Image i is bit-identical whatever `sampling.batch_size` (see `ldm.sampling`; the forward group size is
recorded in the index as `forward_batch`) and whatever the number of ranks sharing the job: under torchrun
each rank draws a contiguous share of whole forward groups of every set on its own device, and rank 0 merges.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..autoencoder import load_vae
from ..checkpoint import list_snapshots, load_final, snapshot_step
from ..config import load_scenario
from ..control import whole_square_image
from ..errors import ConfigError
from ..data.latent_cache import LatentDataset
from ..data.prepared import PreparedRows, read_report
from ..data.split import image_key
from ..layout import data_key
from ..models import model_from_config
from ..provenance import atomic_write_json, digest, file_sha256
from ..ranks import Ranks
from ..recipe import build_run_objective, pad_captions
from ..samples import INDEX, PROMPTS, FinishedParts, save_set
from ..sampling import FORWARD_BATCH, sample_latents
from ..spec import Recipe, Run, Scenario


def image_seeds(seed: int, count: int) -> list[int]:
    return [seed * 1_000_003 + i for i in range(count)]


#: the generator seed of `labels: random` (one fixed draw for every run: recipes are compared on the same labels)
RANDOM_LABELS_SEED = 0


def sampling_conditions(num_samples: int, num_classes: int, original_size: int,
                        labels: str = "balanced") -> tuple[torch.Tensor, torch.Tensor]:
    """Class labels, balanced (image i gets class i mod K) or uniformly random (DiT's `sample_ddp.py`; drawn
    once from a fixed generator), and the control of a whole square image. Data without classes (captions
    only): every label is -1."""
    if num_classes == 0:
        drawn = torch.full((num_samples,), -1, dtype=torch.int64)
    elif labels == "random":
        drawn = torch.randint(0, num_classes, (num_samples,), generator=torch.Generator().manual_seed(RANDOM_LABELS_SEED))
    elif labels == "balanced":
        drawn = torch.arange(num_samples) % num_classes
    else:
        raise ValueError(f"unknown label policy {labels!r}; valid: balanced, random")
    return drawn, whole_square_image(original_size, num_samples)


@torch.no_grad()
def decode_to_uint8(vae, latents: torch.Tensor, scaling: float, shift: float,
                    batch_size: int = FORWARD_BATCH) -> torch.Tensor:
    """uint8 (N, H, W, 3) images. Decoded in groups of `batch_size` from the first latent: a rank's share starts
    on a forward-group boundary, so each image is decoded in the same group as in one process (same bits)."""
    out = []
    for chunk in latents.split(batch_size):
        pixels = vae.decode(chunk / scaling + shift).sample
        out.append(((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out)


def class_caption_rows(cache: LatentDataset, labels: torch.Tensor) -> torch.Tensor:
    """Cache rows whose captions condition class-labelled samples: image i gets the (i // K)-th cached caption
    of its class (cache order, cycling), so captions are class-balanced like the labels, fixed across seeds and
    snapshots, and cond_accuracy still has a class to check."""
    labels_all = cache.rows().column("label")
    by_class = [torch.nonzero(labels_all == c).flatten() for c in range(len(cache.classes))]
    empty = [cache.classes[c] for c, rows in enumerate(by_class) if len(rows) == 0]
    if empty:
        raise ConfigError(f"{cache.dir}: no cached caption of class(es) {empty} to condition on")
    K = len(cache.classes)
    return torch.stack([by_class[int(c)][(i // K) % len(by_class[int(c)])] for i, c in enumerate(labels)])


def heldout_prompt_rows(cache: LatentDataset, prepared: PreparedRows, count: int) -> tuple[torch.Tensor, str]:
    """Cache rows whose captions prompt a text-to-image run on data without classes: the held-out images
    (`dataset.heldout`: never trained on, the captions a real text-to-image evaluation prompts with), one row
    per image (its first crop), non-empty captions, in cache order, cycling when there are fewer than `count`;
    the training images when nothing is held out. Returns (rows, where they came from)."""
    source = "held-out captions"
    candidates = cache.split_rows(heldout=True)
    if len(candidates) == 0:
        candidates, source = cache.split_rows(heldout=False), "training captions (dataset.heldout is 0)"
    cols = prepared.select(candidates.tolist(), ["key", "caption"])
    keep = [r for r, key, cap in zip(candidates.tolist(), cols["key"], cols["caption"])
            if image_key(key) == key and (cap or "").strip()]
    if not keep:
        raise ConfigError(f"{cache.dir}: no {source.split(' (')[0]} to prompt text-to-image sampling with")
    return torch.tensor([keep[i % len(keep)] for i in range(count)], dtype=torch.int64), source


def caption_states(data, rows: torch.Tensor, recipe: Recipe, seed: int):
    """(states, mask) of the cached captions at `rows`, padded as the recipe trains (the noise of
    noisy_replicate from a generator seeded by `seed`, so every sampling seed sees the same captions)."""
    picked = data.gather(rows, ["text_emb", "text_len"])
    return pad_captions(recipe, picked["text_emb"], picked["text_len"], torch.Generator().manual_seed(seed))


def sampling_prompts(scenario: Scenario, run: Run, cache: LatentDataset, labels: torch.Tensor, recipe: Recipe):
    """(caption states, mask, prompts record) of a text-conditional run: class-balanced captions on data with
    classes (`class_caption_rows`), held-out captions on caption-only data (`heldout_prompt_rows`), padded by
    `caption_states`. The record names each image's prompt text and cache row (what CLIPScore scores against)."""
    data = cache.rows()
    if "text_emb" not in data:
        raise ConfigError(f"{cache.dir}: text-conditional sampling needs caption states in the latent cache "
                          "(it was encoded without a text encoder)")
    prepared_dir = scenario.layout.prepared(data_key(run.resolution))
    prepared = PreparedRows(prepared_dir, read_report(prepared_dir))
    if len(prepared) != len(cache):
        raise ConfigError(f"{cache.dir} has {len(cache)} rows but {prepared_dir} {len(prepared)}: re-encode the cache")
    if cache.classes:
        rows, source = class_caption_rows(cache, labels), "training captions of the sampled class"
    else:
        rows, source = heldout_prompt_rows(cache, prepared, len(labels))
    text, mask = caption_states(data, rows, recipe, scenario.config["seed"])
    record = {"source": source, "rows": rows.tolist(), "prompts": prepared.select(rows.tolist(), ["caption"])["caption"]}
    return text, mask, record


@dataclass
class Part:
    """Images [0, n) of one (set, seed, setting) drawn from one snapshot; `draw(lo, hi)` makes images lo..hi.
    `setting` names what image i depends on besides i (snapshot, seed, scales, size condition): two parts of one
    setting hold the same images where they overlap (`sample_run` slices instead of drawing them twice)."""
    name: str
    key: str
    n: int
    snapshot: Path
    draw: Callable[[int, int], torch.Tensor]
    setting: tuple


@dataclass
class SampleSet:
    """One file of the samples directory: its parts, in order, and the columns stored beside the images."""
    file: str
    parts: list[Part]
    columns: dict = field(default_factory=dict)


def sample_sets(scenario: Scenario, run: Run, ranks: Ranks, log=print) -> tuple[list[SampleSet], dict]:
    """Every set the run's samples directory holds (snapshots, sweeps, size conditions) as parts still to draw,
    and the samples index that describes them. Drawing is deferred: a resumed or multi-rank job draws only
    the shares it lacks (`sample_run`)."""
    recipe, scfg = scenario.recipe(run), scenario.sampling(run)
    paths = scenario.layout.run(run.run_id)
    cache = LatentDataset(scenario.layout.latents(run.data_key), verify=False)
    scaling, shift = cache.scaling_factor, cache.shift_factor
    objective = build_run_objective(scenario, run)
    labels, control = sampling_conditions(scfg["num_samples"], len(cache.classes), scfg["original_size"],
                                          scfg["labels"])
    _, model_config, _ = load_final(paths.final)
    latent_shape = tuple(cache.manifest["latent_shape"])
    snapshots = list_snapshots(paths.checkpoints)
    sampler = scenario.sampler(run)
    text, text_mask, prompts = None, None, None
    if recipe.text_conditional:
        text, text_mask, prompts = sampling_prompts(scenario, run, cache, labels, recipe)
    elif not cache.classes:
        raise ConfigError(f"recipe {run.recipe}: class-conditional sampling on {cache.dir}, which has no classes "
                          "(caption-only data needs `conditioning: text`)")
    # loaded on first use: a rank whose shares are all on disk, or rank 0 merging, never builds them
    held = {}

    def on_device(snapshot: Path):
        if "model" not in held:
            held["model"] = model_from_config(model_config).to(ranks.device).eval()
            held["vae"] = load_vae(scenario.layout.vae).to(ranks.device).eval()
        if held.get("snapshot") != snapshot:
            held["model"].load_state_dict(load_file(str(snapshot / "ema.safetensors")))
            held["snapshot"] = snapshot
        return held["model"], held["vae"]

    def drawer(snapshot: Path, seed: int, guidance: float, control_scale: float | None = None,
               size: int | None = None) -> tuple[Callable[[int, int], torch.Tensor], tuple]:
        """(draw, setting): `draw(lo, hi)` makes images lo..hi from `snapshot` at these scales and original size
        (defaults: the config's); `setting` names exactly these arguments (`Part.setting`)."""
        control_scale = float(scfg["guidance_control"] if control_scale is None else control_scale)
        size = int(scfg["original_size"] if size is None else size)

        def draw(lo: int, hi: int) -> torch.Tensor:
            model, vae = on_device(snapshot)
            latents = sample_latents(model, objective, None if text is not None else labels[lo:hi],
                                     whole_square_image(size, hi - lo) if recipe.uses_control else None,
                                     text=None if text is None else text[lo:hi],
                                     text_mask=None if text_mask is None else text_mask[lo:hi],
                                     latent_shape=latent_shape, steps=scfg["steps"], guidance_semantic=guidance,
                                     guidance_control=control_scale,
                                     guidance_interval=scfg["guidance_interval"], seeds=image_seeds(seed, hi)[lo:],
                                     batch_size=scfg["batch_size"], sampler=sampler, micro_batch=FORWARD_BATCH,
                                     guidance_schedule=scfg["guidance_schedule"], guidance_power=scfg["guidance_power"],
                                     guidance_channels=scfg["guidance_channels"])
            return decode_to_uint8(vae, latents, scaling, shift)
        return draw, (str(snapshot), seed, float(guidance), control_scale, size)

    # A part's key names everything its images depend on (the sample rule's hash, the snapshot's weights, the
    # VAE, the prompts): a part file left by a killed job is reused only under the same key.
    vae_id = file_sha256(scenario.layout.trained_vae_config) if scenario.layout.trained_vae_config.is_file() else \
        str(scenario.config["autoencoder"].get("pretrained"))
    base_key = [scenario.run_section(run), scfg, vae_id, None if prompts is None else prompts["rows"]]
    # intermediate snapshots, sweeps and size conditions: the first `aux_samples` images (the same images as the
    # full set's first ones: image i's noise depends on its seed and i only), e.g. FID-10k for a curve point
    n_aux = min(scfg["aux_samples"] or len(labels), len(labels))
    sets, entries, extra = [], [], {}
    for snapshot in snapshots:
        step, weights = snapshot_step(snapshot), file_sha256(snapshot / "ema.safetensors")
        # Every seed for the final weights (mean ± std); the first seed only for the curve's earlier points.
        final = snapshot == snapshots[-1]
        seeds, n = (scfg["seeds"], len(labels)) if final else (scfg["seeds"][:1], n_aux)
        name = f"step-{step:07d}.safetensors"
        sets.append(SampleSet(name, [Part(f"step-{step:07d}.seed-{seed}", digest([*base_key, weights, step, seed, n]),
                                          n, snapshot, *drawer(snapshot, seed, scfg["guidance"]))
                                     for seed in seeds],
                              {"labels": labels[:n].repeat(len(seeds)), "control": control[:n].repeat(len(seeds), 1),
                               "seeds": torch.tensor(seeds, dtype=torch.int64).repeat_interleave(n)}))
        entries.append({"step": step, "file": name, "seeds": seeds, "images": n})
    # the sweeps and size conditions: the final snapshot's weights, the first seed (sizes: every seed)
    last, final_weights, seed = snapshots[-1], weights, scfg["seeds"][0]

    def final_part(name: str, *settings, drawing: tuple) -> Part:
        return Part(name, digest([*base_key, final_weights, *settings]), n_aux, last, *drawing)

    if scfg["guidance_sweep"]:
        scales = [float(g) for g in scfg["guidance_sweep"]]
        sweep_columns = {"labels": labels[:n_aux].repeat(len(scales)),
                         "scales": torch.tensor(scales, dtype=torch.float64).repeat_interleave(n_aux)}
        sets.append(SampleSet("guidance.safetensors", [
            final_part(f"guidance-{g}", "guidance", seed, g, n_aux, drawing=drawer(last, seed, g))
            for g in scales], sweep_columns))
        extra["guidance_sweep"] = {"file": "guidance.safetensors", "scales": scales, "seed": seed,
                                   "step": entries[-1]["step"]}
        if scfg["guidance_sweep_joint"] and recipe.uses_control:
            # one joint scale on both conditions (the control scale follows the semantic one): the guided
            # output is then e(null, null) + w * (e(y, c) - e(null, null)), the single-scale CFG that claim 5
            # compares two-scale guidance with (same seed, same noise, same weights)
            sets.append(SampleSet("guidance_joint.safetensors", [
                final_part(f"guidance_joint-{g}", "joint", seed, g, n_aux, drawing=drawer(last, seed, g, g))
                for g in scales], sweep_columns))
            extra["guidance_sweep_joint"] = {**extra["guidance_sweep"], "file": "guidance_joint.safetensors"}
    if scfg["size_conditions"] and not recipe.uses_control:
        log(f"{run.run_id}: size conditions skipped: recipe {run.recipe} has no control conditioning")
    elif scfg["size_conditions"]:
        sizes = [int(v) for v in scfg["size_conditions"]]
        grid = [(s, size) for s in scfg["seeds"] for size in sizes]
        sets.append(SampleSet("sizes.safetensors", [
            final_part(f"size-{size}.seed-{s}", "size", s, size, n_aux,
                       drawing=drawer(last, s, scfg["guidance"], size=size)) for s, size in grid], {
            "labels": labels[:n_aux].repeat(len(grid)),
            "seeds": torch.tensor([s for s, _ in grid], dtype=torch.int64).repeat_interleave(n_aux),
            "sizes": torch.tensor([size for _, size in grid], dtype=torch.int64).repeat_interleave(n_aux),
            "index": torch.arange(n_aux).repeat(len(grid))}))
        extra["size_conditions"] = {"file": "sizes.safetensors", "sizes": sizes, "seeds": scfg["seeds"],
                                    "step": entries[-1]["step"]}
    index = {
        "run_id": run.run_id, "snapshots": entries, "seeds": scfg["seeds"], "num_samples": scfg["num_samples"],
        "aux_samples": n_aux,
        "sampler": sampler, "steps": scfg["steps"],
        "guidance": {"semantic": scfg["guidance"], "control": scfg["guidance_control"],
                     "interval": scfg["guidance_interval"], "schedule": scfg["guidance_schedule"],
                     "power": scfg["guidance_power"], "channels": scfg["guidance_channels"]},
        "labels": scfg["labels"],
        "forward_batch": FORWARD_BATCH, "image_seeds": "seed * 1000003 + i",
        "original_size": scfg["original_size"], "classes": cache.classes, "resolution": run.resolution,
        # what evaluation needs to cost the model (REPORT.md's efficiency table) without the checkpoint
        "model_config": model_config, "latent_shape": list(latent_shape),
        "text_tokens": 0 if text is None else int(text.shape[1]),
        **({"prompts": {"file": PROMPTS, "source": prompts["source"]}} if prompts else {}), **extra,
    }
    return sets, {"index": index, "prompts": prompts}


def sample_run(scenario: Scenario, run: Run, log=print, ranks: Ranks | None = None) -> Path:
    """Draw and write every sample set of a run. Under torchrun each rank draws its share of every part
    (`Ranks.share`, whole forward groups: the same bytes as one process) into `samples/parts/`; after a
    barrier rank 0 merges the shares into the sets and writes the index. A killed job, any rank, keeps the
    shares it finished (`FinishedParts`) and redoes only the rest."""
    ranks = ranks or Ranks.from_env()
    out = scenario.layout.run(run.run_id).samples
    out.mkdir(parents=True, exist_ok=True)
    sets, described = sample_sets(scenario, run, ranks, log)
    parts = FinishedParts(out, log)

    def share_name(part: Part, lo: int, hi: int) -> tuple[str, str]:
        return f"{part.name}.{lo}-{hi}", digest([part.key, lo, hi])

    started, total = time.perf_counter(), sum(len(s.parts) for s in sets)

    def drawn(part: Part, lo: int, hi: int) -> torch.Tensor:
        """`part.draw(lo, hi)` with a progress line (the rule's log is a file: no progress bar there)."""
        images = part.draw(lo, hi)
        drawn.count += 1
        log(f"{run.run_id}: drew {part.name} images [{lo}, {hi}): part {drawn.count} of {total}, "
            f"{time.perf_counter() - started:.0f} s")
        return images
    drawn.count = 0
    finished: dict[tuple, list[tuple[int, int, str, str]]] = {}  # setting -> its shares finished in this job

    def obtain(part: Part, lo: int, hi: int) -> torch.Tensor:
        """A share's images: its own finished file, else a slice of a finished share of the same setting whose
        forward groups it shares (a sweep point at the main scale is the main set's first images: image i
        depends on its setting and i only, and a group's bits on its members), else drawn."""
        name, key = share_name(part, lo, hi)

        def make() -> torch.Tensor:
            for a, b, other, other_key in finished.get(part.setting, []):
                same_groups = a <= lo and hi <= b and (lo - a) % FORWARD_BATCH == 0 and (
                    hi == b or (hi - a) % FORWARD_BATCH == 0)
                if same_groups and (images := parts.load(other, other_key)) is not None:
                    return images[lo - a:hi - a].clone()
            return drawn(part, lo, hi)

        images = parts.get(name, key, make)
        finished.setdefault(part.setting, []).append((lo, hi, name, key))
        return images

    if ranks.world > 1:
        for sample_set in sets:
            for part in sample_set.parts:
                lo, hi = ranks.share(part.n, FORWARD_BATCH)
                if hi > lo:
                    obtain(part, lo, hi)
        log(f"{run.run_id}: rank {ranks.rank}/{ranks.world} drew its shares"
            + (f" ({parts.reused} reused from an interrupted job)" if parts.reused else "")
            + "; waiting for the other ranks")
        ranks.barrier()
        if not ranks.main:
            return out / INDEX

    def merged(part: Part) -> torch.Tensor:
        if ranks.world == 1:
            return obtain(part, 0, part.n)
        shares = []
        for r in range(ranks.world):
            lo, hi = replace(ranks, rank=r).share(part.n, FORWARD_BATCH)
            images = parts.load(*share_name(part, lo, hi)) if hi > lo else None
            if hi > lo and images is None:
                raise RuntimeError(f"{out}: rank {r}'s share {lo}-{hi} of {part.name} is missing after the barrier")
            shares += [] if images is None else [images]
        return torch.cat(shares)

    for sample_set in sets:
        images = [merged(part) for part in sample_set.parts]
        save_set(out / sample_set.file, {"images": torch.cat(images), **sample_set.columns})
        log(f"{run.run_id}: wrote {sample_set.file} ({len(sample_set.parts)} x {sample_set.parts[0].n} images)")
    index, prompts = described["index"], described["prompts"]
    if prompts is not None:
        atomic_write_json(out / PROMPTS, prompts)
    elif (out / PROMPTS).exists():
        (out / PROMPTS).unlink()
    atomic_write_json(out / INDEX, index)
    parts.clear()
    if parts.reused and ranks.world == 1:
        log(f"{run.run_id}: {parts.reused} image share(s) reused from an interrupted job")
    for stale in ("guidance.safetensors", "guidance_joint.safetensors", "sizes.safetensors"):  # left over from a config that asked for them
        if not any(e.get("file") == stale for e in index.values() if isinstance(e, dict)) and (out / stale).exists():
            (out / stale).unlink()
    return out / INDEX


def run(args) -> None:
    scenario = load_scenario(args.config)
    with Ranks.from_env() as ranks:
        index = sample_run(scenario, scenario.run(args.run), ranks=ranks)
    print(f"samples index: {index}" if ranks.main else f"rank {ranks.rank}/{ranks.world}: shares drawn")
