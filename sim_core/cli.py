"""The ``simbench`` command: one verb per pipeline stage.

Each verb lives in ``experiments/<verb>.py`` with ``add_arguments(parser)``
and ``main(args) -> int``. Bad input (``InputError``) ends the command with
exit code 2 and one line on stderr; a non-finite loss with exit code 3.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from sim_core.errors import InputError, NonFiniteLossError

VERBS = {
    "prepare": "experiments.prepare",
    "train": "experiments.train",
    "evaluate": "experiments.evaluate",
    "predict": "experiments.predict",
    "import": "experiments.import_results",
    "upstream": "experiments.upstream",
    "report": "experiments.report_cli",
    "bench": "experiments.bench",
    "profile": "experiments.profile",
    "repro": "experiments.repro",
    "status": "experiments.status",
}
HELP = {
    "prepare": "prepare a dataset (synthetic, coco128, coco, voc, carparts, custom) as COCO jsons",
    "train": "train one run of the params' runs matrix",
    "evaluate": "evaluate a run on val, or any COCO results file against a GT json",
    "predict": "run a trained model on a folder of images or a split: COCO results and overlay images",
    "import": "convert results of an upstream code base into simbench's results format",
    "upstream": "train and test the authors' own code (a user's checkout) on simbench's data, score it here",
    "report": "write LaTeX tables, figures and report.pdf from the metrics files",
    "bench": "measure speed and memory, side by side, and write bench.json",
    "profile": "make one of the packaged profiles the active params.yaml",
    "repro": "dvc repro with several runs of the matrix at once (same outputs and numbers)",
    "status": "per run: trained, evaluated, and whether its records match the current params",
}


def one_line(text: str, limit: int = 2000) -> str:
    """``text`` on one line (every line break ``str.splitlines`` knows joined with a space), cut to ``limit``."""
    text = " ".join(str(text).splitlines())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr with exit code 2 (like every bad input)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(one_line(f"{self.prog}: error: {message} (see --help)") + "\n")
        raise SystemExit(2)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("simbench")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="simbench", description="Benchmark harness for box-supervised instance segmentation.")
    parser.add_argument("--version", action="version", version=f"simbench {_version()}")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=OneLineParser)
    for verb, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        verb_parser = sub.add_parser(verb, help=HELP[verb], description=HELP[verb])
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except InputError as exc:
        sys.stderr.write(one_line(f"simbench: error: {exc}") + "\n")
        return 2
    except NonFiniteLossError as exc:
        sys.stderr.write(one_line(f"simbench: error: {exc}") + "\n")
        return 3
    except KeyboardInterrupt:
        sys.stderr.write("simbench: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
