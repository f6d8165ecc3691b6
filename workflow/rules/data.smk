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


rule prepare:
    input:
        ancient(f"{W}/raw/synthetic/dataset.json") if CFG["dataset"]["source"] == "synthetic" else [],
    output:
        f"{W}/prepared/{DATASET}/r{{res}}/report.json",
    params:
        h=lambda w: digest([data_section(CFG), w.res]),
        source=raw_source(),
        crop=lambda w: next(
            (s["crop"] for s in CFG["stages"].values() if CFG["resolutions"][s["resolution"]] == int(w.res)),
            "center"),
    resources:
        **rule_resources("prepare"),
    log:
        f"{W}/logs/prepare.r{{res}}.log",
    shell:
        f"{LDM} prepare {{params.source:q}} --out {W}/prepared/{DATASET}/r{{wildcards.res}}"
        f" --resolution {{wildcards.res}} --crop {{params.crop}} --seed {CFG['seed']} > {{log}} 2>&1"


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
        prepared=prepared("{res}"),
        vae=[] if CFG["autoencoder"]["pretrained"] else f"{W}/vae/config.json",
    output:
        f"{W}/latents/{DATASET}/r{{res}}/manifest.json",
    params:
        h=lambda w: digest([data_section(CFG), w.res]),
        vae=vae_path(),
        text=CFG["text_encoder"] or "none",
    threads: CFG["threads"]
    resources:
        **rule_resources("encode"),
    log:
        f"{W}/logs/encode.r{{res}}.log",
    shell:
        f"{LDM} encode --prepared {W}/prepared/{DATASET}/r{{wildcards.res}} --vae {{params.vae:q}}"
        f" --out {W}/latents/{DATASET}/r{{wildcards.res}} --text-encoder {{params.text:q}}"
        f" --threads {{threads}} > {{log}} 2>&1"
