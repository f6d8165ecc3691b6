"""`ldm init-config`: a scenario config for your own dataset, from a template (default: the embedded default).

A copy of `config/default.yaml` would keep `name: default`, `workdir: work`, `results: results`: its run
would overwrite the committed default results and title its report "default". The written config takes its
name, dataset name, workdir (`work/<name>`) and results (`results/<name>`) from `--name`, its source from
`--source` (which must exist), and the template's recipes, stages and study unchanged; it is validated
before it is written, and an existing file is never overwritten.
"""
from __future__ import annotations

import glob
import re
from pathlib import Path

import yaml

from ..config import read_yaml, validate
from ..errors import ConfigError

_NAME = re.compile(r"^[a-z0-9_]+$")


def own_config(template: dict, source: str, name: str) -> dict:
    """`template` with the dataset's own name, source, workdir and results."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: use lower-case letters, digits and _ (it names folders and runs)")
    if not (Path(source).exists() or glob.glob(source)):
        raise ConfigError(f"--source {source}: no such file, folder or glob match")
    config = dict(template)
    dataset = {k: v for k, v in template["dataset"].items() if k != "synthetic"}
    config.update(name=name, workdir=f"work/{name}", results=f"results/{name}",
                  dataset={**dataset, "name": name, "source": str(source)})
    return config


def run(args) -> None:
    out = Path(args.out) if args.out else Path("config") / f"{args.name}.yaml"
    if out.exists():
        raise ConfigError(f"{out}: already exists (not overwritten); pass --out or remove it")
    config = own_config(read_yaml(args.template), args.source, args.name)
    validate(config, source=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Written by `ldm init-config --source {args.source} --name {args.name}` from {args.template}.\n"
    out.write_text(header + yaml.safe_dump(config, sort_keys=False, width=110))
    print(f"wrote {out}: workdir work/{args.name}, results results/{args.name}; "
          f"run it with `snakemake --cores 2 --configfile {out}`")
