"""`ldm models`: architectures and sizes, with parameters and forward GFLOPs at 256/512 px (meta device)."""
from __future__ import annotations

import json

from tabulate import tabulate

from ..models.inventory import inventory


def run(args) -> None:
    rows = inventory(args.arch or None, args.size or None)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(tabulate([{**r, "params": f"{r['params'] / 1e6:.1f}M"} for r in rows], headers="keys"))
