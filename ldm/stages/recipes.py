"""`ldm recipes`: each architecture's own published recipe (`ldm.published_recipes`), one row per value, with
where it is published or why it is assumed: what `own_recipe: true` gives a config recipe."""
from __future__ import annotations

import json
import textwrap

from tabulate import tabulate

from ..errors import UserError
from ..published_recipes import PUBLISHED_RECIPES, recipes_table


def run(args) -> None:
    unknown = sorted(set(args.arch or []) - set(PUBLISHED_RECIPES))
    if unknown:
        raise UserError(f"unknown architecture(s) {unknown}; known: {', '.join(PUBLISHED_RECIPES)}")
    rows = recipes_table(args.arch or None)
    if args.assumed:
        rows = [r for r in rows if r["assumed"]]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    table = [{**r, "value": json.dumps(r["value"]), "assumed": "assumed" if r["assumed"] else "",
              "source": "\n".join(textwrap.wrap(r["source"], 90))} for r in rows]
    print(tabulate(table, headers="keys"))
    n = sum(r["assumed"] for r in rows)
    print(f"\n{len(rows)} values, {n} assumed (source starting 'assumed:'); `own_recipe: true` in a config recipe "
          "takes them where the recipe sets nothing")
