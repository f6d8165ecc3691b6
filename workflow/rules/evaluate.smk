# Evaluation: an offline evaluator trained on the real prepared images, reference statistics per
# resolution, samples from every snapshot of a run, metrics with provenance.
# `ldm sample` also writes the guidance-sweep and size-condition sets (listed in its index.json, sampled
# only when sampling.guidance_sweep / sampling.size_conditions ask for them; both keys are in the rule's hash).


def _local(path):
    """A configured path that is a file or directory here becomes an input (a hub id does not)."""
    return [path] if path and Path(path).exists() else []

rule train_evaluator:
    input:
        prepared(CFG["resolutions"]["high"]),
    output:
        f"{W}/evaluator/config.json",
    params:
        h=digest([data_section(CFG), CFG["evaluator"]]),
    threads: CFG["threads"]
    resources:
        **rule_resources("train_evaluator"),
    log:
        f"{W}/logs/train_evaluator.log",
    shell:
        f"{LDM} train-evaluator --config {CONFIG_JSON} --out {W}/evaluator --threads {{threads}} > {{log}} 2>&1"


rule reference_stats:
    input:
        prepared=prepared("{res}"),
        evaluator=f"{W}/evaluator/config.json",
    output:
        f"{W}/reference/{DATASET}/r{{res}}.npz",
    params:
        h=lambda w: digest([data_section(CFG), CFG["evaluator"], w.res]),
    threads: CFG["threads"]
    resources:
        **rule_resources("reference_stats"),
    log:
        f"{W}/logs/reference_stats.r{{res}}.log",
    shell:
        f"{LDM} reference-stats --prepared {W}/prepared/{DATASET}/r{{wildcards.res}} --evaluator {W}/evaluator"
        f" --out {{output}} --threads {{threads}} > {{log}} 2>&1"


rule sample:
    input:
        model=f"{W}/runs/{{run}}/final.safetensors",
        vae=[] if CFG["autoencoder"]["pretrained"] else f"{W}/vae/config.json",
    output:
        f"{W}/runs/{{run}}/samples/index.json",
    params:
        h=lambda w: digest([run_section(CFG, w.run), CFG["sampling"]]),
    threads: CFG["threads"]
    resources:
        **rule_resources("sample"),
    log:
        f"{W}/logs/sample/{{run}}.log",
    shell:
        f"{LDM} sample --config {CONFIG_JSON} --run {{wildcards.run}} --threads {{threads}} > {{log}} 2>&1"


rule evaluate:
    input:
        samples=f"{W}/runs/{{run}}/samples/index.json",
        evaluator=f"{W}/evaluator/config.json",
        reference=lambda w: f"{W}/reference/{DATASET}/r{RUNS[w.run].resolution}.npz",
        fid_reference=_local(CFG["evaluation"]["reference_stats"]),
        clip=_local(CFG["evaluation"]["clip_model"]),
    output:
        f"{R}/metrics/{{run}}.json",
    params:
        h=lambda w: digest(eval_section(CFG, w.run)),
    threads: CFG["threads"]
    resources:
        **rule_resources("evaluate"),
    log:
        f"{W}/logs/evaluate/{{run}}.log",
    shell:
        f"{LDM} evaluate --config {CONFIG_JSON} --run {{wildcards.run}} --threads {{threads}} > {{log}} 2>&1"
