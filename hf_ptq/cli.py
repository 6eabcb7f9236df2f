"""``hf-ptq``: quantize from a recipe, evaluate a checkpoint, push a folder to the Hub, list recipes.

Exit codes (stable; scripts may rely on them):

    0    success
    1    runtime failure (quantization, evaluation, loading or saving raised)
    2    usage or validation error (bad arguments, invalid recipe or --set, missing input, output exists)
    3    upload failed; the local checkpoint is complete and intact (retry with `hf-ptq push`)
    130  interrupted (Ctrl-C)

Results go to stdout (a summary table, or JSON with ``--json``); progress bars and messages to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UPLOAD = 3
EXIT_INTERRUPTED = 130

_MAIN_EPILOG = """\
examples:
  hf-ptq recipes                                   # list the shipped recipes
  hf-ptq quantize digits-resnet-rtn-w4             # offline demo: digits ResNet, RTN W4, seconds
  hf-ptq quantize my-recipe.yaml --set weight_bits=2 --set calibration.num_samples=256
  hf-ptq evaluate ./digits-resnet-rtn-w4 --dataset builtin:digits
  hf-ptq push ./digits-resnet-rtn-w4 your-name/digits-resnet-rtn-w4 --private

exit codes: 0 ok, 1 runtime failure, 2 usage/validation error, 3 upload failed (local checkpoint intact),
130 interrupted. Set HF_PTQ_DEBUG=1 (or pass --debug) for tracebacks. Docs: docs/publishing.md
"""

_QUANTIZE_EPILOG = """\
RECIPE is a YAML file or the name of a shipped recipe (see `hf-ptq recipes`).
--set KEY=VALUE overrides any recipe key before validation; KEY is a dotted path and VALUE is YAML:
  --set weight_bits=2   --set act_bits=null   --set evaluation.max_samples=1000   --set output.dir=out/w2

examples:
  hf-ptq quantize digits-resnet-rtn-w4
  hf-ptq quantize resnet50-comq-w4a32 --set calibration.num_samples=256 --output-dir r50-comq
  hf-ptq quantize my.yaml --push-to-hub your-name/my-model --private
"""

_EVALUATE_EPILOG = """\
MODEL is a local folder, a Hub id or builtin:digits-resnet; float and hf_ptq checkpoints both work.
--dataset is builtin:digits, builtin:fashion-mnist, a local image folder (imagefolder layout) or a Hub id.

examples:
  hf-ptq evaluate ./digits-resnet-rtn-w4 --dataset builtin:digits
  hf-ptq evaluate your-name/resnet50-comq-w4a32 --dataset ILSVRC/imagenet-1k --split validation --json
"""

_PUSH_EPILOG = """\
Uploads a folder written by `hf-ptq quantize` or hf_ptq.save_quantized (model card included) with
HfApi.create_repo(exist_ok=True) + upload_folder. The token is --token, else HF_TOKEN, else your
`hf auth login` token. The local folder is never modified.

examples:
  hf-ptq push ./digits-resnet-rtn-w4 your-name/digits-resnet-rtn-w4
  hf-ptq push ./out your-name/model --revision w4a8 --commit-message "W4A8 variant"
  hf-ptq push ./out your-org/model --create-pr
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hf-ptq",
        description="Post-training quantization of transformers vision models: recipes, evaluation, Hub upload.",
        epilog=_MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-ptq {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress messages")
    common.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser(
        "quantize", parents=[common], help="quantize a model as a recipe says, evaluate it and save it",
        description="Quantize a model from a recipe, evaluate FP vs quantized top-1, save checkpoint + card.",
        epilog=_QUANTIZE_EPILOG, formatter_class=_Formatter,
    )  # fmt: skip
    q.add_argument("recipe", metavar="RECIPE", help="recipe YAML file or shipped recipe name")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    q.add_argument("-o", "--output-dir", help="where to save (default: the recipe's output.dir)")
    q.add_argument("--overwrite", action="store_true", default=None, help="replace an existing checkpoint folder")
    q.add_argument("--no-eval", action="store_true", help="skip the FP and quantized evaluation")
    q.add_argument("--push-to-hub", metavar="REPO_ID", help="upload after saving (overrides push.repo_id)")
    q.add_argument("--private", action="store_true", default=None, help="create the Hub repo as private")
    q.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")

    e = sub.add_parser(
        "evaluate", parents=[common], help="top-1 of a checkpoint on a labelled image dataset",
        description="Top-1 accuracy of an image classifier (float or hf_ptq) on a dataset split.",
        epilog=_EVALUATE_EPILOG, formatter_class=_Formatter,
    )  # fmt: skip
    e.add_argument("model", metavar="MODEL", help="checkpoint folder, Hub id or builtin:digits-resnet")
    e.add_argument("--dataset", required=True, help="builtin:digits, builtin:fashion-mnist, a folder or a Hub id")
    e.add_argument("--dataset-config", help="Hub dataset configuration name")
    e.add_argument("--split", default="test", help="split to evaluate (default: test)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--max-samples", type=int, help="evaluate only the first N images")
    e.add_argument("--revision", help="model revision on the Hub")
    e.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser(
        "push", parents=[common], help="upload a saved hf_ptq checkpoint folder to the Hub",
        description="Upload an hf_ptq checkpoint folder (with its model card) to a Hub model repo.",
        epilog=_PUSH_EPILOG, formatter_class=_Formatter,
    )  # fmt: skip
    p.add_argument("folder", metavar="DIR", help="folder written by `hf-ptq quantize` or hf_ptq.save_quantized")
    p.add_argument("repo_id", metavar="REPO_ID", help="namespace/name on the Hub")
    p.add_argument("--private", action="store_true", default=None, help="create the repo as private (if it does not exist)")
    p.add_argument("--revision", help="branch to commit to (created if missing)")
    p.add_argument("--commit-message", help="commit title")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")

    r = sub.add_parser(
        "recipes", parents=[common], help="list the shipped recipes, or print one",
        description="List the recipes shipped with hf_ptq, or print one (to copy and edit).",
        epilog="examples:\n  hf-ptq recipes\n  hf-ptq recipes digits-resnet-rtn-w4 > my-recipe.yaml\n",
        formatter_class=_Formatter,
    )  # fmt: skip
    r.add_argument("name", nargs="?", metavar="NAME", help="print this recipe's YAML")
    r.add_argument("--json", action="store_true", help="list as JSON")
    return parser


# -- helpers ---------------------------------------------------------------------------------------
def _err(message: str) -> None:
    print(f"hf-ptq: error: {message}", file=sys.stderr)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _summary_table(s: Any) -> str:
    change = "-" if s.fp_top1 is None or s.quantized_top1 is None else f"{100 * (s.quantized_top1 - s.fp_top1):+.2f} pt"
    where = f"{s.eval_dataset} [{s.eval_split}], {s.eval_samples} images" if s.eval_dataset else "not evaluated"
    rows = [
        ["model", "top-1", "change", "weights", "quantize", "evaluate"],
        ["float", _pct(s.fp_top1), "", _mib(s.fp_bytes), "", _secs(s.fp_eval_seconds)],
        [s.label, _pct(s.quantized_top1), change, _mib(s.quantized_bytes), _secs(s.quantize_seconds), _secs(s.quantized_eval_seconds)],
    ]
    return (
        f"\nhf-ptq summary: {s.recipe} (top-1 on {where})\n\n{_table(rows)}\n\n"
        f"saved: {s.output_dir}  (total {s.total_seconds:.1f} s)"
    )


def _log(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: print(f"hf-ptq: {msg}", file=sys.stderr, flush=True))


# -- commands --------------------------------------------------------------------------------------
def _cmd_quantize(args: argparse.Namespace) -> int:
    from .hub import push_to_hub
    from .pipeline import run_recipe
    from .recipes import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    push = recipe.schema.push
    repo_id = args.push_to_hub or push.repo_id
    if args.push_to_hub:
        from .pipeline import UsageError
        from .recipes import PushSpec

        try:
            PushSpec(repo_id=repo_id)  # validate the repo id before hours of work
        except ValueError:
            raise UsageError(f"--push-to-hub {repo_id!r}: must look like 'namespace/name'.") from None
    summary = run_recipe(
        recipe,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        evaluate=False if args.no_eval else None,
        log=_log(args.quiet),
    )
    result: dict[str, Any] = summary.to_dict()
    print(json.dumps(result, indent=2) if args.json else _summary_table(summary))
    if repo_id:
        info = push_to_hub(
            summary.output_dir,
            repo_id,
            private=args.private if args.private is not None else push.private,
            revision=push.revision,
            commit_message=push.commit_message,
            create_pr=push.create_pr,
            token=args.token,
        )
        url = getattr(info, "pr_url", None) or getattr(info, "commit_url", info)
        print(f"pushed: {url}", file=sys.stderr if args.json else sys.stdout)  # keep --json stdout parseable
    return EXIT_OK


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from transformers import AutoModelForImageClassification

    from .evaluation import evaluate_model
    from .pipeline import UsageError, load_split, resolve_model
    from .recipes import DatasetSpec, ModelSpec

    if args.batch_size <= 0 or (args.max_samples is not None and args.max_samples <= 0):
        raise UsageError("--batch-size and --max-samples must be positive integers.")
    try:
        model_spec = ModelSpec.model_validate(args.model)
        spec = DatasetSpec.model_validate(args.dataset)
    except ValueError as err:
        raise UsageError(f"{err}") from None
    if args.revision:
        model_spec.revision = args.revision
    if args.dataset_config:
        spec.config = args.dataset_config
    source = resolve_model(model_spec)
    _log(args.quiet)(f"loading {source}")
    model = AutoModelForImageClassification.from_pretrained(source, revision=model_spec.revision)
    ds = load_split(spec, args.split)
    result = evaluate_model(
        model,
        ds,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        image_column=spec.image_column,
        label_column=spec.label_column,
    )
    qc = getattr(model.config, "quantization_config", None)
    out = {
        "model": source,
        "quantized": qc is not None,
        "dataset": spec.describe(),
        "split": args.split,
        "top1": result["top1"],
        "num_samples": result["num_samples"],
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"model    : {source}{' (hf_ptq quantized)' if qc is not None else ''}")
        print(f"dataset  : {out['dataset']} [{args.split}], {out['num_samples']} images")
        print(f"top-1    : {_pct(out['top1'])}")
    return EXIT_OK


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub
    from .pipeline import UsageError

    try:
        info = push_to_hub(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            create_pr=args.create_pr,
            token=args.token,
        )
    except ValueError as err:  # not an hf_ptq folder, no card, create_pr with revision
        raise UsageError(str(err)) from None
    print(f"pushed: {getattr(info, 'pr_url', None) or getattr(info, 'commit_url', info)}")
    return EXIT_OK


def _recipe_row(name: str, path) -> dict[str, Any]:
    import yaml

    from .recipes import RecipeError, load_recipe

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raw = {}
    try:
        load_recipe(path)
        status = "ok"
    except RecipeError as err:
        status = "invalid: " + str(err).splitlines()[0].split(": ", 1)[-1]
    act, model = raw.get("act_bits"), raw.get("model")
    if isinstance(model, dict):
        model = model.get("id") or f"builtin:{model.get('builtin')}"
    return {
        "name": name,
        "model": str(model),
        "method": str(raw.get("method", "rtn")),
        "bits": f"W{raw.get('weight_bits', 4)}A{act or 32}",
        "status": status,
        "path": str(path),
        "description": " ".join(str(raw.get("description") or "").split()),
    }


def _cmd_recipes(args: argparse.Namespace) -> int:
    from .recipes import RecipeError, shipped_recipes, shipped_recipes_dir

    shipped = shipped_recipes()
    if args.name:
        name = args.name.removesuffix(".yaml")
        if name not in shipped:
            raise RecipeError(f"no shipped recipe {args.name!r}. Shipped recipes: {', '.join(shipped)}.")
        sys.stdout.write(shipped[name].read_text(encoding="utf-8"))
        return EXIT_OK
    rows = [_recipe_row(name, path) for name, path in shipped.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    table = [["name", "model", "method", "bits", "status"]]
    table += [[r["name"], r["model"], r["method"], r["bits"], r["status"]] for r in rows]
    print(_table(table))
    print(f"\n{len(rows)} recipes in {shipped_recipes_dir()}; print one with `hf-ptq recipes NAME`.")
    return EXIT_OK


_COMMANDS = {"quantize": _cmd_quantize, "evaluate": _cmd_evaluate, "push": _cmd_push, "recipes": _cmd_recipes}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-ptq`` console script; returns the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2)
        return int(exc.code or 0)
    debug = args.debug or os.environ.get("HF_PTQ_DEBUG", "") not in ("", "0")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from .hub import HubUploadError
    from .pipeline import UsageError
    from .recipes import RecipeError

    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except HubUploadError as err:
        _err(str(err))
        return EXIT_UPLOAD
    except (RecipeError, UsageError, FileExistsError, FileNotFoundError) as err:
        if debug:
            traceback.print_exc()
        _err(str(err))
        return EXIT_USAGE
    except Exception as err:  # anything else is a runtime failure; say what and how to see more
        if debug:
            traceback.print_exc()
        _err(f"{type(err).__name__}: {err}" + ("" if debug else "\n(run with --debug or HF_PTQ_DEBUG=1 for the traceback)"))
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
