# Evaluation: an offline evaluator trained on the real prepared images, reference statistics per
# resolution, samples from every snapshot of a run, metrics with provenance.
# `ldm sample` also writes the guidance-sweep and size-condition sets (listed in its index.json, sampled
# only when sampling.guidance_sweep / sampling.size_conditions ask for them; both keys are in the rule's hash).
# The Inception FIDs (fid_clean, fid_legacy_tf) compare with Inception statistics of the real images that
# `reference-stats --inception` caches next to the evaluator statistics, unless evaluation.reference_stats names a
# statistics file. A config without them keeps the commands, outputs and hashes it had before they existed.
from ldm.metrics.registry import eval_hash_section, inception_modes


def _local(path):
    """A configured path that is a file or directory here becomes an input (a hub id does not)."""
    return [path] if path and Path(path).exists() else []


REFERENCE_FILES = CFG["evaluation"]["reference_stats"] or {}


def _inception_modes(config):
    """clean-fid modes whose real-image statistics reference-stats writes (those without a statistics file)."""
    files = config["evaluation"]["reference_stats"] or {}
    return inception_modes(m for m in config["evaluation"]["metrics"] if m not in files)


INCEPTION_MODES = _inception_modes(CFG)


def _inception_references(res):
    return [str(L.inception_reference(res, mode)) for mode in INCEPTION_MODES]


def _reference_stats_hash(scenario, w):
    config = scenario.config
    modes = _inception_modes(config)
    parts = [scenario.data_section(), config["evaluator"], w.res]
    if modes:  # appended only when wanted: other configs keep their hash
        parts.append({"inception": modes, "max_images": config["evaluation"]["inception_max_images"]})
    return digest(parts)


def _evaluator_hash(scenario, w):
    return digest([scenario.data_section(), scenario.config["evaluator"]])


def _evaluate_hash(scenario, w):
    return digest(eval_hash_section(scenario.eval_section(scenario.runs[w.run])))


_REFERENCE_ARGS = f"--prepared {q(L.prepared(data_key('{wildcards.res}')))} --evaluator {q(L.evaluator)}"
if INCEPTION_MODES:
    _cap = CFG["evaluation"]["inception_max_images"]
    _REFERENCE_ARGS += ("".join(f" --inception {mode}" for mode in INCEPTION_MODES)
                        + (f" --inception-max-images {_cap}" if _cap is not None else "")
                        + f" --out {'{output[0]}' if _SAFE_DIRS else '{output[0]:q}'}")
else:  # the command text as it was (Snakemake's code trigger compares it)
    _REFERENCE_ARGS += f" --out {OUTPUT}"

rule train_evaluator:
    input:
        unpack(unless_restored(lambda w: L.evaluator_config, _evaluator_hash,
                               {"prepared": prepared(CFG["resolutions"]["high"]),
                                "checks": checks(data_key(CFG["resolutions"]["high"]))})),
    output:
        str(L.evaluator_config),
    params:
        h=_evaluator_hash(SCENARIO, None),
    threads: CFG["threads"]
    resources:
        **rule_resources("train_evaluator"),
    log:
        str(L.log("train_evaluator.log")),
    shell:
        f"{LDM} train-evaluator --config {CONFIG_ARG} --out {q(L.evaluator)} --threads {{threads}} > {LOG} 2>&1"


rule reference_stats:
    input:
        unpack(unless_restored(lambda w: L.reference(w.res), _reference_stats_hash,
                               lambda w: {"prepared": prepared(w.res), "evaluator": str(L.evaluator_config)})),
    output:
        str(L.reference("{res}")),
        _inception_references("{res}"),
    params:
        h=lambda w: _reference_stats_hash(SCENARIO, w),
    threads: CFG["threads"]
    resources:
        **rule_resources("reference_stats"),
    log:
        str(L.log("reference_stats.r{res}.log")),
    shell:
        f"{LDM} reference-stats {_REFERENCE_ARGS} --threads {{threads}} > {LOG} 2>&1"


rule sample:
    priority: 20  # the training chain first (Snakefile, "Priorities")
    input:
        model=str(L.run("{run}").final),
        vae=[] if CFG["autoencoder"]["pretrained"] else str(L.trained_vae_config),
    output:
        str(L.run("{run}").samples_index),
    params:
        h=lambda w: digest([SCENARIO.run_section(RUNS[w.run]), SCENARIO.sampling(RUNS[w.run])]),
        # one process, or torchrun over the rule's GPUs (each rank draws its share; same bytes as one process)
        launch=launcher(job_resources(CFG, "sample"), q(sys.executable)),
    threads: CFG["threads"]
    resources:
        **rule_resources("sample"),
    log:
        str(L.log("sample/{run}.log")),
    shell:
        f"{{params.launch}} -m ldm.cli sample --config {CONFIG_ARG} --run {{wildcards.run}} --threads {{threads}}"
        f" > {LOG} 2>&1"


rule evaluate:
    priority: 10  # the training chain first (Snakefile, "Priorities")
    input:
        unpack(unless_restored(lambda w: L.metrics(w.run), _evaluate_hash, lambda w: {
            "samples": str(L.run(w.run).samples_index),
            "evaluator": str(L.evaluator_config),
            "reference": str(L.reference(RUNS[w.run].resolution)),
            "inception_references": _inception_references(RUNS[w.run].resolution),
            "fid_reference": [f for path in REFERENCE_FILES.values() for f in _local(path)],
            "clip": _local(CFG["evaluation"]["clip_model"])})),
    output:
        str(L.metrics("{run}")),
    params:
        h=lambda w: _evaluate_hash(SCENARIO, w),
        # one process, or torchrun over the rule's GPUs (each rank scores its share of every image set)
        launch=launcher(job_resources(CFG, "evaluate"), q(sys.executable)),
    threads: CFG["threads"]
    resources:
        **rule_resources("evaluate"),
    log:
        str(L.log("evaluate/{run}.log")),
    shell:
        f"{{params.launch}} -m ldm.cli evaluate --config {CONFIG_ARG} --run {{wildcards.run}} --threads {{threads}}"
        f" > {LOG} 2>&1"
