"""The ``presso`` command line.

Every subcommand loads and validates the job config first; a user error (a bad key, a missing
file, a corrupt artifact) prints one line and exits non-zero, with no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from presso import PressoError, disk_full

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
  presso algorithms                                 every recipe algorithm and its settings
  presso algorithms gptq                            one algorithm's settings and defaults
  presso mlflow sync                                replay what an MLflow outage left spooled
  presso submit jobs/quickstart.yaml --address http://HEAD:8265 --working-dir . --follow

environment: RAY_ADDRESS (a Ray cluster; default: a local Ray), MLFLOW_TRACKING_URI (default:
sqlite under run.output_dir), PRESSO_CACHE (downloads and models; default ~/.cache/presso).
"""


def _job_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("job", help=JOB_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    return p


SUBMIT_EPILOG = """\
The cluster runs `presso run JOB key=value ...` with the presso installed there (its image, or
--pip). With --working-dir the folder is uploaded (without .venv, .git, outputs and whatever
.gitignore lists) and JOB is taken relative to it; without it, JOB must exist on the cluster.

Tracking: the job logs to tracking.uri, else to --tracking URI (sent as MLFLOW_TRACKING_URI),
which every node must reach; without one, submit refuses (the job's sqlite store would be lost
with its working directory) unless --tracking local-to-job says that is wanted.

Token authentication (on by default for `ray start --head`): presso sends the token from
$RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH; never ~/.ray/auth_token by itself (any
`ray start --head` on the machine writes one). Get it on the head with `ray get-auth-token`.
"""


def _submit_parser(sub) -> None:
    p = _job_parser(sub, "submit", "submit the whole pipeline as a job to a Ray cluster")
    p.epilog, p.formatter_class = SUBMIT_EPILOG, argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
        help="the cluster's Jobs API, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)",
    )
    p.add_argument(
        "--tracking", metavar="URI",
        help="the MLflow server the job logs to (every node must reach it), or local-to-job",
    )  # fmt: skip
    p.add_argument("--follow", action="store_true", help="stream the logs; exit 0 only on success")
    p.add_argument(
        "--lost-after",
        type=float,
        default=60.0,
        metavar="S",
        help="with --follow: give up after S seconds without an answer from the cluster "
        "(default 60)",
    )
    p.add_argument("--working-dir", metavar="DIR", help="upload DIR (e.g. .) as the job's folder")
    p.add_argument("--pip", action="append", default=[], metavar="PKG", help="install PKG first")
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="set in the job's environment, e.g. MLFLOW_TRACKING_URI=http://mlflow:5000",
    )  # fmt: skip


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
    _job_parser(
        sub, "run", "run the whole pipeline: train → compress (→ recover) → evaluate → register"
    )
    _job_parser(sub, "train", "run only the train stage (Ray Train, data-parallel)")
    _job_parser(
        sub,
        "compress",
        "compress model.source (no training; recover it if recover.enabled) and register it",
    )
    _job_parser(sub, "eval", "evaluate model.source: test perplexity, bytes, tokens/s")
    _submit_parser(sub)
    config = sub.add_parser("config", help="inspect job configs")
    config_sub = config.add_subparsers(dest="config_command", metavar="action", required=True)
    _job_parser(config_sub, "show", "print the fully resolved config of a job (YAML)")
    text = "list the recipe algorithms: settings, types, defaults and what each is for"
    algorithms = sub.add_parser("algorithms", help=text, description=text)
    algorithms.add_argument("names", nargs="*", metavar="NAME", help="only these, e.g. gptq")
    _mlflow_parser(sub)
    return parser


def _mlflow_parser(sub) -> None:
    mlflow = sub.add_parser("mlflow", help="replay MLflow records spooled during an outage")
    actions = mlflow.add_subparsers(dest="mlflow_command", metavar="action", required=True)
    text = (
        "replay what MLflow missed while it was unreachable: the spools a run leaves under "
        "run.output_dir/<run.name>/mlflow-spool/"
    )
    sync = actions.add_parser("sync", help=text, description=text)
    sync.add_argument(
        "spools", nargs="*", metavar="SPOOL_DIR",
        help="a spool, or a folder holding some (default: presso_runs, the default output_dir)",
    )  # fmt: skip
    sync.add_argument("--uri", help="replay to this tracking URI instead of the recorded one")


def _mlflow_sync(args: argparse.Namespace) -> int:
    from pathlib import Path

    from presso.orchestrator.config import RunConfig
    from presso.orchestrator.delivery import sync_all

    sync_all([Path(p) for p in args.spools] or [Path(RunConfig().output_dir)], args.uri)
    return 0


STAGES = {
    "run": ("train", "compress", "recover", "eval"),
    "train": ("train",),
    "compress": ("compress", "recover"),
    "eval": ("eval",),
}


def _submit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from presso.orchestrator.submit import submit

    if not args.address:
        parser.error("submit: --address (or $RAY_API_SERVER_ADDRESS) is required")
    return submit(
        args.job, args.overrides, args.address, working_dir=args.working_dir,
        pip=args.pip, env=args.env, tracking=args.tracking, follow=args.follow,
        lost_after_s=args.lost_after,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from presso.orchestrator.pipeline import quiet_environment

    quiet_environment()
    if args.version:
        from presso import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "mlflow":
            return _mlflow_sync(args)
        if args.command == "algorithms":
            from presso.orchestrator.algorithms import render

            print(render(args.names), end="")
            return 0
        from presso.orchestrator.config import load_config, to_yaml

        if args.command == "submit":
            return _submit(parser, args)
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
    except Exception as e:  # OSError, or a library's own error type (safetensors, pyarrow)
        if not disk_full(e):
            raise
        where = getattr(e, "filename", None)
        print(
            f"presso: error: no space left on device{f' writing {where}' if where else ''}"
            "; free space or set run.output_dir to a folder on a larger disk",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("presso: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
