# Training: one job per run of the grid (recipe x stage); a stage with `init` starts from another's weights.

def train_inputs(wildcards):
    run = RUNS[wildcards.run]
    inputs = {"latents": f"{W}/latents/{DATASET}/r{run.resolution}/manifest.json"}
    if run.init_run:
        inputs["init"] = f"{W}/runs/{run.init_run}/final.safetensors"
    return inputs


rule train:
    input:
        unpack(train_inputs),
    output:
        f"{W}/runs/{{run}}/final.safetensors",
    params:
        h=lambda w: digest(run_section(CFG, w.run)),
    threads: CFG["threads"]
    log:
        f"{W}/logs/train/{{run}}.log",
    shell:
        "{LDM} train --config {CONFIG_JSON} --run {wildcards.run} --threads {threads} > {log} 2>&1"
