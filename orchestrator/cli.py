"""The ``presso`` command line.

Every subcommand loads and validates the job config first; a user error (a bad key, a missing
file, a corrupt artifact) prints one line and exits non-zero, with no traceback.
"""

from __future__ import annotations

import argparse
import sys

from presso import PressoError

JOB_HELP = "job spec, e.g. jobs/quickstart.yaml (see `presso config show` for every key)"
OVERRIDES_HELP = (
    "config overrides as dotted key=value pairs, e.g. train.steps=50 compress.workers=1"
)

EPILOG = """\
examples:
  presso run jobs/quickstart.yaml                   train, compress, evaluate, register
  presso run jobs/quickstart.yaml train.steps=50    the same, shorter
  presso compress jobs/smollm2_rtn.yaml             compress a pretrained model only
  presso config show jobs/quickstart.yaml           print the resolved config

environment: RAY_ADDRESS (a Ray cluster; default: a local Ray), MLFLOW_TRACKING_URI (default:
sqlite under run.output_dir), PRESSO_CACHE (downloads and models; default ~/.cache/presso).
"""


def _job_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("job", help=JOB_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="presso",
        description="Train with compressed communication, compress the model, evaluate and "
        "register it — on a laptop or a Ray cluster, tracked in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="command")
    _job_parser(sub, "run", "run the whole pipeline: train → compress → evaluate → register")
    _job_parser(sub, "train", "run only the train stage (Ray Train, data-parallel)")
    _job_parser(sub, "compress", "compress model.source (no training) and register the artifact")
    _job_parser(sub, "eval", "evaluate model.source: test perplexity, bytes, tokens/s")
    config = sub.add_parser("config", help="inspect job configs")
    config_sub = config.add_subparsers(dest="config_command", metavar="action", required=True)
    _job_parser(config_sub, "show", "print the fully resolved config of a job (YAML)")
    return parser


STAGES = {
    "run": ("train", "compress", "eval"),
    "train": ("train",),
    "compress": ("compress",),
    "eval": ("eval",),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from presso import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        from presso.orchestrator.config import load_config, to_yaml

        cfg = load_config(args.job, args.overrides)
        if args.command == "config":
            print(to_yaml(cfg), end="")
            return 0
        from presso.orchestrator.pipeline import run_pipeline
        from presso.orchestrator.report import print_summary

        print_summary(run_pipeline(cfg, STAGES[args.command]))
        return 0
    except PressoError as e:
        print(f"presso: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("presso: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
