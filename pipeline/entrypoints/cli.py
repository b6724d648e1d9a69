"""pipeline: every stage as a subcommand, plus 'run' for the whole chain.

Exit status: 0 success; 2 bad input, unreachable source or failed validation (one line on
stderr naming the file or suite, what was expected and what was found); 143 a training
interrupted by SIGTERM (run it again to resume); 1 internal error or outage.
--json prints the stage's reference as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from pipeline.config import Settings
from pipeline.config.serving import RUNTIMES
from pipeline.entrypoints.commands import (
    cmd_acquire,
    cmd_evaluate,
    cmd_export,
    cmd_gate,
    cmd_history,
    cmd_infra_validate,
    cmd_monitor,
    cmd_predict,
    cmd_preprocess,
    cmd_promote,
    cmd_register,
    cmd_rollback,
    cmd_run,
    cmd_serve,
    cmd_summary,
    cmd_train,
    cmd_validate,
)
from pipeline.entrypoints.flags import add_flags
from pipeline.errors import PipelineError


def _print_human(command: str, result: dict[str, Any]) -> None:
    if command == "summary":
        from pipeline.entrypoints.summary import format_summary

        print(format_summary(result))
        return
    if command == "monitor":
        verdict = "DRIFT: " + "; ".join(result["reasons"]) if result["drifted"] else "no drift"
        print(
            f"{verdict}\nreport: {result['report_uri']}\nagainst {result['model_name']} "
            f"v{result['model_version']} ({result['model_alias']}); MLflow run {result['run_id']}"
        )
        return
    if command == "run":
        from pipeline.entrypoints.summary import format_run

        print(format_run(result))
        return
    if command == "history":
        from pipeline.registry.history import AliasMove, format_history

        print(format_history([AliasMove.from_dict(e) for e in result["history"]]))
        return
    if command in ("promote", "rollback"):
        if not result["moved"]:
            print(f"{result['alias']} is version {result['to_version']} already; nothing moved")
        else:
            print(
                f"{result['alias']}: version {result['from_version'] or '(none)'} -> {result['to_version']}  "
                f"({result['action']} #{result['seq']} by {result['actor']})"
            )
        return
    if command == "gate":
        print(
            f"gate {'passed' if result['passed'] else 'failed'}: candidate v{result['version']} accuracy "
            f"{result['candidate']['accuracy']:.4f}"
            + (
                f", production v{result['production']['version']} {result['production']['accuracy']:.4f}"
                if result["production"]
                else ", no production version yet"
            )
        )
        return
    if command == "predict":
        for p in result["predictions"]:
            print(f"{p['file']}\t{p['class_name']}\t{p['probability']:.4f}")
        return
    if command == "export":
        print(
            f"{result['model_name']} v{result['version']}: float model (pt2) {result['float_bytes'] / 1e3:.0f} kB, "
            f"test accuracy {result['float_accuracy']:.4f} on {result['test_images']} images"
        )
        for variant in result["variants"]:
            verdict = "passed" if not variant["reasons"] else "failed: " + "; ".join(variant["reasons"])
            print(
                f"  {variant['name']:<10} {variant['bytes'] / 1e3:>8.0f} kB  accuracy {variant['test_accuracy']:.4f}  "
                f"agreement {variant['agreement']:.4f}  {verdict}  ({variant['artifact']} in run {result['run_id']})"
            )
        return
    for key, value in result.items():
        if not isinstance(value, (dict, list)):
            print(f"{key}: {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log progress (-v) or everything (-vv) on stderr; default: errors only",
    )
    common.add_argument(
        "--model",
        metavar="NAME",
        help="registered model to act on (default: $PIPELINE_MODEL_NAME, else named after the dataset: "
        "<dataset>-classifier, fashion-mnist-classifier for the default source)",
    )

    def add(name: str, func: Callable[..., dict[str, Any]], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add(
        "run",
        cmd_run,
        "run the whole chain: acquire, validate, preprocess, train, evaluate, register, gate, "
        "infra-validate (alias staging), and promote with --promotion auto",
    )
    add_flags(p, "acquire", "preprocess", "train", "tune", "gate", "run")
    p = add("acquire", cmd_acquire, "fetch the four IDX files into content-addressed storage")
    add_flags(p, "acquire")
    p = add("validate", cmd_validate, "check an acquired dataset with the Great Expectations suites")
    p.add_argument("--dataset", required=True, help="dataset hash printed by 'pipeline acquire'")
    p = add("preprocess", cmd_preprocess, "deduplicate and split an acquired dataset")
    p.add_argument("--dataset", required=True, help="dataset hash printed by 'pipeline acquire'")
    add_flags(p, "preprocess")
    p = add("train", cmd_train, "train a model on processed data, tracked in MLflow")
    p.add_argument("--processed", required=True, help="processed hash printed by 'pipeline preprocess'")
    add_flags(p, "train", "force", "recipe")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="a tag for the MLflow run; repeatable")
    p = add("evaluate", cmd_evaluate, "evaluate a training run on the test split")
    p.add_argument("--run-id", required=True, help="MLflow run id printed by 'pipeline train'")
    p = add("register", cmd_register, "register a run's model and set the alias 'candidate'")
    p.add_argument("--run-id", required=True, help="MLflow run id printed by 'pipeline train'")
    p = add(
        "gate",
        cmd_gate,
        "evaluate a version against production on the same test data; exit 2 if it fails the promotion policy",
    )
    p.add_argument("--version", required=True, help="the candidate's version number")
    p.add_argument("--processed", help="processed hash of the test data (default: the version's own)")
    add_flags(p, "gate")
    p = add(
        "export",
        cmd_export,
        "export a version to ONNX and INT8, score both on the test split against the float model and tag the version",
    )
    p.add_argument("--version", required=True, help="the version's number")
    p.add_argument("--processed", help="processed hash of the test images (default: the version's own)")
    p.add_argument("--force", dest="force_export", action="store_true", help="export again a version that was exported")
    add_flags(p, "gate")
    p = add(
        "infra-validate",
        cmd_infra_validate,
        "serve a version in a fresh process, check its answers against offline predictions, then set the alias staging",
    )
    p.add_argument("--version", required=True, help="a version that passed the gate")
    p.add_argument("--processed", help="processed hash of the test images (default: the version's own)")
    p = add("promote", cmd_promote, "move the alias production to the staging version (or --version)")
    p.add_argument("--version", help="version to promote (default: the one with alias staging)")
    p.add_argument("--reason", help="why, for the promotion history")
    p = add("rollback", cmd_rollback, "move the alias production back to the previous production version")
    p.add_argument("--to", help="version to go back to (default: the one before the current)")
    p.add_argument("--reason", help="why, for the promotion history")
    p = add("history", cmd_history, "list every alias move of the registered model (promotion history)")
    p = add(
        "serve",
        cmd_serve,
        "serve a registered model over HTTP (/predict, /health, /ready, /metadata, "
        "/metrics); on an alias, follow it when it moves",
    )
    p.add_argument(
        "--model-uri", help="models:/<name>@<alias> or models:/<name>/<version> (default: models:/<model>@production)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument(
        "--poll-interval", type=float, default=10.0, help="seconds between registry checks of the alias (10)"
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="what answers: the pt2 program (torch), or the version's ONNX float32 or INT8 variant on ONNX "
        "Runtime, if it passed its checks (default: $PIPELINE_SERVE_RUNTIME, else torch)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the port, each with its own copy of the model; 0: one per CPU core "
        "(default: $PIPELINE_SERVE_WORKERS, else 1)",
    )
    p = add(
        "monitor",
        cmd_monitor,
        "check a batch of new images for drift against the production (else "
        "candidate) model's data; writes a drift report",
    )
    p.add_argument(
        "--batch",
        help="folder, file://, http(s):// or s3:// prefix with images-idx3-ubyte.gz and "
        "optionally labels-idx1-ubyte.gz (default: $PIPELINE_INCOMING_URI or <home>/new-data)",
    )
    p = add(
        "predict",
        cmd_predict,
        "classify image files or folders with an exported ONNX or INT8 model, offline "
        "(needs onnxruntime, numpy and pillow only: no torch, no MLflow)",
    )
    p.add_argument(
        "--onnx-model",
        required=True,
        metavar="FILE",
        help="model.onnx or model.int8.onnx, with the signature.json export stores beside it (the run's onnx/)",
    )
    p.add_argument("images", nargs="+", help="image files or folders of them")
    p = add("summary", cmd_summary, "show a registered version (by alias), its metrics and how to open the UIs")
    p.add_argument("--alias", default="candidate", help="registry alias to show (candidate)")
    return parser


def configure_logging(verbosity: int) -> None:
    """Quiet by default so that a failure is one line on stderr; ``-v`` shows the stages' progress."""
    level = {0: logging.ERROR, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Below the level asked for, nothing is printed, whatever level a library gives its own logger
    # (Great Expectations sets INFO on one of its loggers when it is imported).
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    if verbosity == 0:
        # A store's database error is logged with its traceback before it is raised; the CLI
        # says it in one line (RegistryUnavailableError).
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    if verbosity < 2:
        warnings.filterwarnings("ignore")
        # MLflow configures its own handler when imported; this is the way to quiet it.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING" if verbosity else "ERROR")
        for noisy in (
            "great_expectations",
            "alembic",
            "botocore",
            "urllib3",
            "mlflow",
            "lightning",
            "pytorch_lightning",
        ):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        settings = Settings.from_env()
        result = args.func(args, settings.for_model(args.model) if args.model else settings)
    except PipelineError as exc:  # bad input (2), an interrupted training (143): one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # an internal error: the traceback is for whoever fixes it
        logging.getLogger("pipeline").exception("internal error")
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    from pipeline.training.hardware import is_global_rank_zero

    if not is_global_rank_zero():
        return 0  # a DDP rank Lightning launched: rank 0 reports the result
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        _print_human(args.command, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
