"""``python -m hwlm.server [MODEL] [flags]``: the same as ``hwlm serve``."""

from __future__ import annotations

import argparse
import logging
import sys

from hwlm.cli.serve import add_serve_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hwlm.server")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    subparsers = parser.add_subparsers(dest="command")
    add_serve_parser(subparsers)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except ValueError as exc:
        logging.getLogger("hwlm.server").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
