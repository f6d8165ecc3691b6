# Report: comparison tables (md + csv), metric-vs-step curves and sample grids from the metrics JSONs;
# with a guidance sweep configured, the combined sweep figure and table too.

localrules: report  # seconds of pandas/matplotlib: not worth a cluster job


rule report:
    input:
        [str(L.metrics(r)) for r in RUNS],
    output:
        str(L.summary),
        str(L.table("runs")) + ".md",
        [str(L.plot("guidance.png")), str(L.table("guidance_sweep")) + ".md"] if CFG["sampling"]["guidance_sweep"] else [],
        [str(L.report)] if CFG.get("study") else [],
    params:
        h=digest([CFG["name"], list(RUNS), CFG.get("study")]),
    log:
        str(L.log("report.log")),
    shell:
        f"{LDM} report --config {CONFIG_ARG} > {LOG} 2>&1"
