# Report: comparison tables (md + csv), metric-vs-step curves and sample grids from the metrics JSONs.

rule report:
    input:
        expand(f"{R}/metrics/{{run}}.json", run=RUNS),
    output:
        f"{R}/summary.json",
        f"{R}/tables/runs.md",
    params:
        h=digest([CFG["name"], list(RUNS)]),
    log:
        f"{W}/logs/report.log",
    shell:
        "{LDM} report --config {CONFIG_JSON} > {log} 2>&1"
