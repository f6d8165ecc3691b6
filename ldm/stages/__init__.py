"""One module per `ldm` command, each named as its command. No stage imports another: what two stages
share lives one floor down (`ldm.spec`, `ldm.layout`, `ldm.checkpoint`, `ldm.recipe`, `ldm.samples`, ...).
Each module exposes `run(args)`, called by `ldm.cli` with the parsed arguments."""
