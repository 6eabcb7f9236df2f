"""Save a quantized model as a complete, self-describing folder, and upload it to the Hub.

``save_quantized`` writes checkpoint + image processor + model card (``README.md``) + per-unit plot +
``recipe.yaml`` + ``hf_ptq_report.json`` into a temporary sibling folder and renames it into place,
so a crash never leaves a half-written checkpoint. ``push_to_hub`` uploads such a folder with
``HfApi.create_repo(exist_ok=True)`` + ``upload_folder`` — not transformers' own ``push_to_hub``,
which would replace our card with a generic one (hf-integration.md §5).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from .card import PLOT_FILENAME, EvalReport, base_model_license, build_model_card, is_hub_id, plot_unit_errors
from .config import QUANT_METHOD, PTQConfig

__all__ = ["save_quantized", "push_to_hub", "HubUploadError", "REPORT_FILENAME", "RECIPE_FILENAME"]

REPORT_FILENAME = "hf_ptq_report.json"
RECIPE_FILENAME = "recipe.yaml"


class HubUploadError(RuntimeError):
    """An upload failed; the message says at which step, why, and that the local folder is intact."""

    def __init__(self, message: str, folder: Path) -> None:
        super().__init__(message)
        self.folder = folder


# -- save --------------------------------------------------------------------------------------------
def _quantization_config(model: torch.nn.Module) -> PTQConfig:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD:
        config = PTQConfig(**config)
    if not isinstance(config, PTQConfig) or not config.is_prequantized:
        raise ValueError(
            f"{type(model).__name__} was not quantized by hf_ptq (no hf_ptq quantization_config with quantized "
            "modules). Quantize it first: from_pretrained(..., quantization_config=hf_ptq.PTQConfig(...))."
        )
    return config


def _recipe_text(recipe: Any) -> str | None:
    from .recipes import Recipe

    if recipe is None:
        return None
    if isinstance(recipe, Recipe):
        return recipe.text
    if isinstance(recipe, dict):
        import yaml

        return yaml.safe_dump(recipe, sort_keys=False)
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe and Path(recipe).is_file()):
        return Path(recipe).read_text(encoding="utf-8")
    if isinstance(recipe, str):
        return recipe
    raise TypeError(f"recipe must be an hf_ptq Recipe, YAML text, a path or a dict, not {type(recipe).__name__}")


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor in the state dict (≈ the safetensors file without its header)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def _check_target(target: Path, overwrite: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another save_directory.")
    if not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (CLI: --overwrite) or another folder.")
    if any(target.iterdir()) and not (target / "config.json").is_file():
        raise FileExistsError(
            f"{target} is not empty and holds no checkpoint (no config.json); refusing to replace it even with "
            "overwrite=True. Choose an empty or new folder."
        )


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` folder to ``target``; an existing ``target`` is swapped out, then deleted."""
    if not target.exists():
        os.replace(tmp, target)  # atomic: tmp is a sibling on the same filesystem
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(backup, target)  # put the previous checkpoint back
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _default_processor(model: torch.nn.Module) -> Any:
    """The processor saved beside the model's source folder, if any (never downloads)."""
    source = getattr(model, "name_or_path", None)
    if source and (Path(source) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(source)
    return None


def save_quantized(
    model: torch.nn.Module,
    save_directory: str | os.PathLike,
    *,
    image_processor: Any = None,
    eval_results: EvalReport | dict[str, Any] | None = None,
    recipe: Any = None,
    base_model: str | None = None,
    license: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a quantized model as a complete folder (checkpoint, processor, card, recipe, report); returns it.

    Args:
        model: a model quantized by hf_ptq (``from_pretrained(..., quantization_config=PTQConfig(...))``).
        save_directory: destination; built in a temporary sibling and renamed into place.
        image_processor: saved beside the weights (default: the one in the model's source folder, if any).
        eval_results: measured top-1 (:class:`EvalReport` or a dict of its fields) for the card's ``model-index``.
        recipe: the recipe used (``Recipe``, YAML text, path or dict), saved as ``recipe.yaml`` and quoted in the card.
        base_model: Hub id of the float model (default: the recipe's or the model's source when it is a Hub id).
        license: card license (default: the base model's, read from its local card or the Hub cache).
        model_name: card title / ``model-index`` name.
        repo_id: the Hub repo the folder is meant for (used in the card's loading snippet).
        overwrite: replace an existing checkpoint folder (never a non-empty folder without ``config.json``).
    """
    from .recipes import Recipe

    config = _quantization_config(model)
    target = Path(save_directory).expanduser().absolute()
    _check_target(target, overwrite)
    evaluation = EvalReport.coerce(eval_results)
    schema = recipe.schema if isinstance(recipe, Recipe) else None
    source = getattr(model, "name_or_path", None) or None
    if base_model is None:
        candidates = [schema.output.base_model, schema.model.id] if schema else []
        base_model = next((c for c in [*candidates, source] if c and is_hub_id(c)), None)
    if license is None:
        license = (schema.output.license if schema else None) or base_model_license(
            base_model, source if source and Path(source).is_dir() else None
        )
    model_name = model_name or (schema.output.model_name if schema else None)
    repo_id = repo_id or (schema.push.repo_id if schema else None)
    calibration = schema.calibration_dataset().describe() if schema and schema.calibration_dataset() else None
    image_processor = image_processor if image_processor is not None else _default_processor(model)
    report = getattr(model, "hf_ptq_report", None)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the final folder gets normal permissions
    try:
        model.save_pretrained(tmp)
        if image_processor is not None:
            image_processor.save_pretrained(tmp)
        plot = None
        if report and report.get("units"):
            title = f"{config.method}: per-unit error"
            plot = PLOT_FILENAME if plot_unit_errors(report["units"], tmp / PLOT_FILENAME, title) else None
        text = _recipe_text(recipe)
        if text is not None:
            (tmp / RECIPE_FILENAME).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        card = build_model_card(
            config,
            report=report,
            eval_results=evaluation,
            recipe_text=text,
            base_model=base_model,
            license=license,
            model_name=model_name,
            model_ref=repo_id or target.name,
            calibration_dataset=calibration,
            plot_name=plot,
            size_bytes=state_dict_bytes(model),
        )
        card.save(tmp / "README.md")
        payload = {
            **(report or {}),
            "evaluation": None if evaluation is None else evaluation.__dict__,
            "card": card.data.to_dict(),
        }
        (tmp / REPORT_FILENAME).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# -- push --------------------------------------------------------------------------------------------
def _check_checkpoint_dir(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder. Save the model first: hf_ptq.save_quantized(model, {str(folder)!r}).")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} holds no config.json; it is not a saved checkpoint.")
    qc = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"{folder} is not an hf_ptq checkpoint (quantization_config.quant_method={qc.get('quant_method')!r}); "
            "push float models with transformers' push_to_hub."
        )
    if not (folder / "README.md").is_file():
        raise ValueError(
            f"{folder} has no README.md model card; save it with hf_ptq.save_quantized(model, dir) (or "
            "`hf-ptq quantize`), which writes the card."
        )


def _hint(err: BaseException, repo_id: str) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    name = type(err).__name__
    if status == 401 or name in ("LocalTokenNotFoundError",):
        return "Authentication failed: log in with `hf auth login`, set HF_TOKEN, or pass token=... (CLI: --token)."
    if status == 403:
        return f"The token cannot write to {repo_id.split('/')[0]!r}: use a token with write access to that namespace."
    if status == 404:
        return "The repository or branch was not found: check repo_id and revision, and that the token can see it."
    if name in ("OfflineModeIsEnabled",):
        return "HF_HUB_OFFLINE is set: unset it to upload."
    if name in ("ConnectError", "ConnectTimeout", "ReadTimeout") or isinstance(err, (ConnectionError, TimeoutError)):
        return "The Hub could not be reached: check the network (and HF_ENDPOINT if you set it)."
    return "The reason given by the Hub is quoted above."


def _upload(
    folder: Path,
    repo_id: str,
    *,
    private: bool | None,
    revision: str | None,
    commit_message: str | None,
    commit_description: str | None,
    token: str | bool | None,
    create_pr: bool,
):
    from huggingface_hub import HfApi

    from . import __version__

    api = HfApi()
    stage = "creating the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        if revision is not None:
            stage = f"creating branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        stage = "uploading the files"
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload hf_ptq quantized checkpoint (hf_ptq {__version__})",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            token=token,
        )
    except Exception as err:
        detail = " ".join(str(err).split()) or "(no message)"
        detail = detail if len(detail) <= 600 else detail[:600] + " ..."
        status = getattr(getattr(err, "response", None), "status_code", None)
        code = f" (HTTP {status})" if status is not None else ""
        raise HubUploadError(
            f"Upload of {folder} to {repo_id!r} failed while {stage}{code}: {type(err).__name__}: {detail}\n"
            f"{_hint(err, repo_id)}\n"
            f"The local checkpoint {folder} is intact; retry with `hf-ptq push {folder} {repo_id}` "
            f"or hf_ptq.push_to_hub({str(folder)!r}, {repo_id!r}).",
            folder,
        ) from err


def push_to_hub(
    model_or_dir: torch.nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    save_directory: str | os.PathLike | None = None,
    **save_kwargs: Any,
):
    """Upload a quantized model (or a folder written by :func:`save_quantized`) with its card; returns ``CommitInfo``.

    Args:
        model_or_dir: a model quantized by hf_ptq (saved first, with ``save_kwargs``), or a saved folder.
        repo_id: ``namespace/name``; created if missing (``exist_ok=True``), ``private`` applies only then.
        revision: branch to commit to (created from the default branch if missing).
        token: as in huggingface_hub: a token string, else the ``HF_TOKEN`` env var or the stored
            ``hf auth login`` token; ``False`` sends none.
        create_pr: open a pull request against the default branch instead of committing (not with ``revision``).
        save_directory: where to keep the saved folder when a model is given (default: a temporary folder,
            deleted after a successful upload and kept, with its path in the error, after a failed one).

    Raises:
        HubUploadError: the Hub refused or could not be reached; the local folder is left as it was.
    """
    if create_pr and revision:
        raise ValueError("create_pr=True opens a PR against the default branch; do not pass revision with it.")
    upload = dict(
        private=private,
        revision=revision,
        commit_message=commit_message,
        commit_description=commit_description,
        token=token,
        create_pr=create_pr,
    )
    if isinstance(model_or_dir, (str, os.PathLike)):
        if save_kwargs or save_directory is not None:
            raise TypeError("save_directory and save options apply only when a model is given, not a folder.")
        folder = Path(model_or_dir).expanduser().absolute()
        _check_checkpoint_dir(folder)
        return _upload(folder, repo_id, **upload)
    if save_directory is not None:
        folder = save_quantized(model_or_dir, save_directory, repo_id=repo_id, **save_kwargs)
        return _upload(folder, repo_id, **upload)
    staging = Path(tempfile.mkdtemp(prefix="hf_ptq-push-"))
    folder = save_quantized(model_or_dir, staging / repo_id.split("/")[-1], repo_id=repo_id, **save_kwargs)
    result = _upload(folder, repo_id, **upload)  # on failure the staged folder is kept for a retry
    shutil.rmtree(staging, ignore_errors=True)
    return result
