# Data: raw images -> prepared crops per resolution -> autoencoder -> latent cache per resolution.

def prepared(res):
    return str(L.prepared_report(data_key(res)))


rule synthesize:
    output:
        str(L.synthetic / "dataset.json"),
    params:
        h=digest(CFG["dataset"]) + str(CFG["seed"]),
        n=CFG["dataset"].get("synthetic", {}).get("num_images"),
        corrupt=CFG["dataset"].get("synthetic", {}).get("corrupt"),
        world=CFG["dataset"].get("synthetic", {}).get("world", "simple"),
    log:
        str(L.log("synthesize.log")),
    shell:
        f"{LDM} synthesize --out {q(L.synthetic)} --num-images {{params.n}} --corrupt {{params.corrupt}}"
        f" --world {{params.world}}"
        f" --seed {CFG['seed']} > {LOG} 2>&1"


def data_params(key, scenario=SCENARIO):
    """(resolution, crop, rerun hash) of a data key (`Run.data_key`: `r<px>` or `r<px>-<crop>`)."""
    px, crop = parse_data_key(key)
    # center-crop keys keep the hash they had before crops were per stage (no spurious reruns)
    parts = [scenario.data_section(), str(px)] + ([] if crop == "center" else [crop])
    return px, crop, digest(parts)


rule prepare:
    """Decode, validate, resize and crop the source at one resolution with one crop policy."""
    input:
        ancient(str(L.synthetic / "dataset.json")) if CFG["dataset"]["source"] == "synthetic" else [],
    output:
        str(L.prepared_report("{data}")),
    params:
        h=lambda w: data_params(w.data)[2],
        source=L.source(CFG["dataset"]["source"]),
        crop=lambda w: data_params(w.data)[1],
        px=lambda w: data_params(w.data)[0],
        crops=lambda w: 1 if data_params(w.data)[1] == "center" else CFG["dataset"]["random_crops"],
    # one worker process per cpu of the job (`resources.prepare.cpus`; a local run caps threads at --cores)
    threads: rule_resources("prepare")["cpus_per_task"]
    resources:
        **rule_resources("prepare"),
    log:
        str(L.log("prepare.{data}.log")),
    # `--workers` (same files as one process) only with several cpus: at 1 the command text, and with it
    # Snakemake's rerun decision for existing workdirs, stays as it was
    shell:
        f"{LDM} prepare {{params.source:q}} --out {q(L.prepared('{wildcards.data}'))}"
        f" --resolution {{params.px}} --crop {{params.crop}} --crops {{params.crops}} --seed {CFG['seed']}"
        + (" --workers {threads}" if rule_resources("prepare")["cpus_per_task"] > 1 else "")
        + f" > {LOG} 2>&1"


# Checks that need the prepared data (ldm/data/checks.py): a single class, an empty class folder, no caption
# for a text recipe or a phantom class of duplicates fails here, in one line, before any training.
localrules: check_data  # one pass over one prepared directory, no GPU: not worth a cluster job

# Classes matter to a class-conditional recipe and to cond_accuracy; a text-only study of an unlabelled
# corpus (CC12M) has none. Captions matter as soon as one recipe is text-conditional.
CHECK_CLASSES = 2 if (any(not r.text_conditional for r in SCENARIO.recipes.values())
                      or "cond_accuracy" in CFG["evaluation"]["metrics"]) else 0
CHECK_CAPTIONS = any(r.text_conditional for r in SCENARIO.recipes.values())


def checks(key):
    """The check record of a data key, as an input of the jobs that read that data. Ancient: a rerun of the
    check alone (say `--captions` after a text recipe is added) retrains nothing; new data reruns those jobs
    anyway, through the prepared report or the latent cache."""
    return ancient(str(L.prepared(key) / "checks.json"))


rule check_data:
    """Classes, captions and duplicates of one prepared data key; the record is written only if all hold."""
    input:
        str(L.prepared_report("{data}")),
    output:
        str(L.prepared("{data}") / "checks.json"),
    log:
        str(L.log("check_data.{data}.log")),
    shell:
        f"{LDM} check-data {q(L.prepared('{wildcards.data}'))} --min-classes {CHECK_CLASSES}"
        f"{' --captions' if CHECK_CAPTIONS else ''} --out {OUTPUT} > {LOG} 2>&1"


if not CFG["autoencoder"]["pretrained"]:

    def vae_hash(scenario, w):
        return digest(scenario.data_section())

    rule train_vae:
        priority: 50  # the training chain first (Snakefile, "Priorities")
        input:
            unless_restored(lambda w: L.trained_vae_config, vae_hash,
                            [prepared(CFG["resolutions"]["low"]), prepared(CFG["resolutions"]["high"])]),
        output:
            str(L.trained_vae_config),
        params:
            h=vae_hash(SCENARIO, None),
        threads: CFG["threads"]
        resources:
            **rule_resources("train_vae"),
        log:
            str(L.log("train_vae.log")),
        shell:
            f"{LDM} train-vae --config {CONFIG_ARG} --out {q(L.trained_vae)} --threads {{threads}} > {LOG} 2>&1"


rule encode:
    priority: 40  # the training chain first (Snakefile, "Priorities")
    input:
        # a restored manifest without its shards (latents not shared) stands for no cache: rebuilt when asked for
        unpack(unless_restored(lambda w: L.latents_manifest(w.data),
                               lambda scenario, w: data_params(w.data, scenario)[2],
                               lambda w: {"prepared": str(L.prepared_report(w.data)),
                                          "vae": [] if CFG["autoencoder"]["pretrained"] else str(L.trained_vae_config)},
                               complete=lambda w: missing_shard_error(L.latents(w.data)) is None)),
    output:
        str(L.latents_manifest("{data}")),
    params:
        h=lambda w: data_params(w.data)[2],
        vae=L.vae,
        text=CFG["text_encoder"] or "none",
        heldout=CFG["dataset"]["heldout"],
        split_seed=CFG["seed"],
    threads: CFG["threads"]
    resources:
        **rule_resources("encode"),
    log:
        str(L.log("encode.{data}.log")),
    shell:
        f"{LDM} encode --prepared {q(L.prepared('{wildcards.data}'))} --vae {{params.vae:q}}"
        f" --out {q(L.latents('{wildcards.data}'))} --text-encoder {{params.text:q}}"
        f" --heldout {{params.heldout}} --split-seed {{params.split_seed}}"
        f" --threads {{threads}} > {LOG} 2>&1"
