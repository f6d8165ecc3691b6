# Training: one job per run of the grid (recipe x stage); a stage with `init` starts from another's weights.

def train_inputs(wildcards):
    run = RUNS[wildcards.run]
    missing = missing_shard_error(L.latents(run.data_key))
    # before any job starts, not as a training job failing on every retry; a manifest restored without its shards
    # (`ldm artifacts restore`, latents not shared) is no error: encode refills the cache first
    if missing and not (RESTORED and str(L.latents_manifest(run.data_key)) in RESTORED.files):
        raise WorkflowError(missing)
    inputs = {"latents": str(L.latents_manifest(run.data_key)), "checks": checks(run.data_key)}
    if run.init_run:
        inputs["init"] = str(L.run(run.init_run).final)
    elif run.init_checkpoint:  # another scenario's run (dataset transfer): links the two modules' DAGs
        inputs["init"] = run.init_checkpoint
    return inputs


def train_hash(scenario, w):
    return digest(scenario.run_section(scenario.runs[w.run]))


rule train:
    priority: 30  # the training chain first (Snakefile, "Priorities")
    input:
        unpack(unless_restored(lambda w: L.run(w.run).final, train_hash, train_inputs)),
    output:
        str(L.run("{run}").final),
    params:
        h=lambda w: train_hash(SCENARIO, w),
        launch=lambda w: launcher(job_resources(CFG, "train", RUNS[w.run].stage, RUNS[w.run].recipe),
                                    q(sys.executable)),
    threads: CFG["threads"]
    resources:
        runtime=run_resources("runtime"),
        mem_mb=run_resources("mem_mb"),
        cpus_per_task=run_resources("cpus_per_task"),
        nodes=run_resources("nodes"),
        gpu=run_resources("gpu"),
        mpi=run_resources("mpi"),
        tasks=run_resources("tasks"),
        slurm_extra=lambda w: slurm_resources("train", w.run).get("slurm_extra", ""),
    log:
        str(L.log("train/{run}.log")),
    shell:
        # one process, or torchrun (multi-GPU) / srun + torchrun (multi-node) per the stage's resources
        f"{{params.launch}} -m ldm.cli train --config {CONFIG_ARG} --run {{wildcards.run}} --threads {{threads}}"
        f" > {LOG} 2>&1"
