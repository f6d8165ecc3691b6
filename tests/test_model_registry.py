"""The architecture registry: one entry per architecture file, agreeing with the schema and with the models
built before the registry existed (configs and parameter layouts captured from that code)."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

import ldm.control
from ldm.models import ARCHITECTURES, REGISTRY, build_model, model_from_config, published_fid
from ldm.models import conditioning
from ldm.models.base import ArchitectureInfo, DiffusionModel
from ldm.models.inventory import PUBLISHED_CONDITIONING, PUBLISHED_SIZE

ROOT = Path(__file__).resolve().parents[1]
# one JSON record per line: arch, size, options, the config and a digest of the parameter/buffer names and
# shapes, captured from the model code before the registry refactor (tiny/small: latent 8, 4 channels,
# 10 classes; published sizes: latent 32, 4 channels, 1000 classes). When semantic="attention" became joint
# attention, the old single-token cross-attention was renamed "cross_attention" (those records: the same
# layouts under the new name), the improved model's records were re-captured, and joint-attention records added;
# when the control vector gained the flip flag (crop group 4 -> 5 scalars), the records with control were re-captured.
REFERENCE = [json.loads(line) for line in (ROOT / "tests" / "model_registry_reference.jsonl").read_text().splitlines()]
REFERENCE_ARCHS = {r["arch"] for r in REFERENCE}


def _layout_digest(model: torch.nn.Module) -> str:
    params = [[n, list(p.shape)] for n, p in model.named_parameters()]
    buffers = [[n, list(b.shape)] for n, b in model.named_buffers()]
    return hashlib.sha256(json.dumps([params, buffers], separators=(",", ":")).encode()).hexdigest()[:16]


def _build(arch: str, size: str, options: dict) -> torch.nn.Module:
    geometry = (dict(latent_size=8, in_channels=4, num_classes=10) if size in ("tiny", "small")
                else dict(latent_size=32, in_channels=4, num_classes=1000))
    with torch.device("meta"):
        return build_model(arch, size, **geometry, **options)


def test_schema_arch_enum_is_the_registry():
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    enum = schema["properties"]["recipes"]["additionalProperties"]["properties"]["arch"]["enum"]
    assert sorted(enum) == sorted(REGISTRY), "schema recipes.arch enum and ldm.models.REGISTRY disagree"
    assert len(enum) == len(set(enum))


def test_registry_entries_are_the_architecture_files_own():
    # order of `ldm models` for the architectures the reference was taken with (a new one may go anywhere)
    assert [a for a in REGISTRY if a in REFERENCE_ARCHS] == ["dit", "pixart", "mmdit", "improved", "mdt", "unet"]
    for name, info in REGISTRY.items():
        assert isinstance(info, ArchitectureInfo) and info.name == name
        assert issubclass(info.cls, DiffusionModel) and info.cls.arch == name
        module = __import__(info.cls.__module__, fromlist=["ARCHITECTURE"])
        assert module.ARCHITECTURE is info
        assert info.published_size in info.sizes
        assert ARCHITECTURES[name] == (info.cls, info.sizes)
    assert PUBLISHED_SIZE == {name: info.published_size for name, info in REGISTRY.items()}
    assert PUBLISHED_CONDITIONING["pixart"] == {"learn_sigma": True, "text_dim": 4096, "text_tokens": 120}
    assert PUBLISHED_CONDITIONING["mmdit"] == {"learn_sigma": False, "text_dim": 4096, "text_tokens": 333}


def test_published_fid_as_the_study_reports_it():
    fid = published_fid()
    assert list(fid.items()) == [
        ("dit", (2.27, "DiT-XL/2, Peebles & Xie 2023 (512 px: 3.04)")),
        ("mdt", (1.58, "MDTv2-XL/2, Gao et al. 2023")),
        ("unet", (3.60, "LDM-4-G, Rombach et al. 2022")),
        ("improved", (None, "2411.03177: 2.76 at ImageNet 512 px (summary site, unverified)")),
    ]


def test_reference_covers_every_arch_and_size():
    """Every size of every architecture the reference was taken with (before the refactor) is compared."""
    covered = {(r["arch"], r["size"]) for r in REFERENCE if r["options"] == {}}
    assert REFERENCE_ARCHS <= set(REGISTRY)
    assert covered == {(arch, size) for arch in REFERENCE_ARCHS for size in REGISTRY[arch].sizes}


@pytest.mark.parametrize("record", REFERENCE, ids=lambda r: f"{r['arch']}-{r['size']}-{json.dumps(r['options'])}")
def test_config_and_layout_unchanged_by_the_refactor(record):
    model = _build(record["arch"], record["size"], record["options"])
    assert list(model.config.items()) == list(record["config"].items())  # values and key order (checkpoint JSON)
    assert _layout_digest(model) == record["params_sha"]
    with torch.device("meta"):
        assert model_from_config(json.loads(json.dumps(model.config))).config == model.config


@pytest.mark.parametrize("arch", list(REGISTRY))
def test_capability_hooks_answer_without_probing(arch):
    model = _build(arch, "tiny", {})
    assert model.has_pos_embed == (arch != "unet")
    assert model.masks_tokens == (arch == "mdt")  # mDT's default mask_ratio is 0.3
    assert model.learns_sigma == model.config["learn_sigma"] == (model.out_channels == 2 * model.in_channels)
    assert model.takes_control == bool(model.config["control_mode"])
    state = {"a": torch.zeros(1)}
    assert callable(getattr(model, "set_pos_embed_base", None)) == model.has_pos_embed
    if arch != "mdt":  # no grid-shaped learned tables: a low-res state loads as it is
        assert model.adapt_low_res_state(state, model.config) == state
    assert _build(arch, "tiny", {"learn_sigma": not model.config["learn_sigma"]}).learns_sigma != model.learns_sigma


def test_mdt_without_masking_does_not_mask():
    assert not _build("mdt", "tiny", {"mask_ratio": 0.0}).masks_tokens


def test_control_vector_is_described_once():
    assert conditioning.CONTROL_FIELDS is ldm.control.CONTROL_FIELDS
    assert conditioning.CONTROL_GROUPS is ldm.control.CONTROL_GROUPS
    embedder = conditioning.ControlEmbedder(32)
    with pytest.raises(ValueError) as err:
        embedder(torch.zeros(2, ldm.control.CONTROL_WIDTH - 1), torch.zeros(2))
    assert str(err.value) == ("control must be (B, 7) ('orig_h', 'orig_w', 'crop_top', 'crop_left', 'crop_h', "
                              "'crop_w', 'flip'), got (2, 6)")
