# Data: raw images -> prepared crops per resolution -> autoencoder -> latent cache per resolution.

def prepared(res):
    return f"{W}/prepared/{DATASET}/r{res}/report.json"


def raw_source():
    source = CFG["dataset"]["source"]
    return f"{W}/raw/synthetic/folders" if source == "synthetic" else source


def vae_path():
    return CFG["autoencoder"]["pretrained"] or f"{W}/vae"


rule synthesize:
    output:
        f"{W}/raw/synthetic/dataset.json",
    params:
        h=digest(CFG["dataset"]) + str(CFG["seed"]),
        n=CFG["dataset"].get("synthetic", {}).get("num_images"),
        corrupt=CFG["dataset"].get("synthetic", {}).get("corrupt"),
    log:
        f"{W}/logs/synthesize.log",
    shell:
        f"{LDM} synthesize --out {W}/raw/synthetic --num-images {{params.n}} --corrupt {{params.corrupt}}"
        f" --seed {CFG['seed']} > {{log}} 2>&1"


def data_params(key):
    """(resolution, crop, rerun hash) of a data key (`Run.data_key`: `r<px>` or `r<px>-<crop>`)."""
    px, crop = parse_data_key(key)
    # center-crop keys keep the hash they had before crops were per stage (no spurious reruns)
    parts = [data_section(CFG), str(px)] + ([] if crop == "center" else [crop])
    return px, crop, digest(parts)


rule prepare:
    """Decode, validate, resize and crop the source at one resolution with one crop policy."""
    input:
        ancient(f"{W}/raw/synthetic/dataset.json") if CFG["dataset"]["source"] == "synthetic" else [],
    output:
        f"{W}/prepared/{DATASET}/{{data}}/report.json",
    params:
        h=lambda w: data_params(w.data)[2],
        source=raw_source(),
        crop=lambda w: data_params(w.data)[1],
        px=lambda w: data_params(w.data)[0],
    resources:
        **rule_resources("prepare"),
    log:
        f"{W}/logs/prepare.{{data}}.log",
    shell:
        f"{LDM} prepare {{params.source:q}} --out {W}/prepared/{DATASET}/{{wildcards.data}}"
        f" --resolution {{params.px}} --crop {{params.crop}} --seed {CFG['seed']} > {{log}} 2>&1"


if not CFG["autoencoder"]["pretrained"]:

    rule train_vae:
        input:
            [prepared(CFG["resolutions"]["low"]), prepared(CFG["resolutions"]["high"])],
        output:
            f"{W}/vae/config.json",
        params:
            h=digest(data_section(CFG)),
        threads: CFG["threads"]
        resources:
            **rule_resources("train_vae"),
        log:
            f"{W}/logs/train_vae.log",
        shell:
            f"{LDM} train-vae --config {CONFIG_JSON} --out {W}/vae --threads {{threads}} > {{log}} 2>&1"


rule encode:
    input:
        prepared=f"{W}/prepared/{DATASET}/{{data}}/report.json",
        vae=[] if CFG["autoencoder"]["pretrained"] else f"{W}/vae/config.json",
    output:
        f"{W}/latents/{DATASET}/{{data}}/manifest.json",
    params:
        h=lambda w: data_params(w.data)[2],
        vae=vae_path(),
        text=CFG["text_encoder"] or "none",
    threads: CFG["threads"]
    resources:
        **rule_resources("encode"),
    log:
        f"{W}/logs/encode.{{data}}.log",
    shell:
        f"{LDM} encode --prepared {W}/prepared/{DATASET}/{{wildcards.data}} --vae {{params.vae:q}}"
        f" --out {W}/latents/{DATASET}/{{wildcards.data}} --text-encoder {{params.text:q}}"
        f" --threads {{threads}} > {{log}} 2>&1"
