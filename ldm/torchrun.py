"""`torchrun` whose own options are never abbreviated: `python -m ldm.torchrun [torchrun options] -m ldm.cli ...`.

torchrun parses its whole command line with argparse's prefix matching on, so the job's own `--run RUN`
(`ldm train|sample|evaluate`) reads to it as an ambiguous abbreviation of `--run-path` / `--run_path` and it
exits with a usage error before any worker starts. The rules' launcher (`ldm.config.launcher`) starts this
module instead: the same parser and the same `run`, with `allow_abbrev` off, so everything after the script or
module name reaches the workers as written."""
from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.run import get_args_parser, run


def parse_args(argv: list[str]):
    parser = get_args_parser()
    parser.allow_abbrev = False
    return parser.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> None:
    run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
