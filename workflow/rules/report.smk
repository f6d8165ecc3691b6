# Report: comparison tables (md + csv), metric-vs-step curves and sample grids from the metrics JSONs;
# with a guidance sweep configured, the combined sweep figure and table too.

localrules: report  # seconds of pandas/matplotlib: not worth a cluster job


rule report:
    input:
        expand(f"{R}/metrics/{{run}}.json", run=RUNS),
    output:
        f"{R}/summary.json",
        f"{R}/tables/runs.md",
        [f"{R}/plots/guidance.png", f"{R}/tables/guidance_sweep.md"] if CFG["sampling"]["guidance_sweep"] else [],
        [f"{R}/REPORT.md"] if CFG.get("study") else [],
    params:
        h=digest([CFG["name"], list(RUNS), CFG.get("study")]),
    log:
        f"{W}/logs/report.log",
    shell:
        f"{LDM} report --config {CONFIG_JSON} > {{log}} 2>&1"
