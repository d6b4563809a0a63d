"""Hub model ids (``org/name``, ``org/name@revision``) resolved to a snapshot in huggingface_hub's cache.

The download takes the model's config and tokenizer files and only the safetensors weights
it uses (`rlsparsity.analysis.checkpoints.hub_weight_files`); pickle weights are refused and
remote code is never trusted (`loading`). The snapshot directory is named by the commit it
resolved to, so the sweep pins every trial to that commit (`snapshot_revision`, tagged
``model_revision``). ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` apply as everywhere
in huggingface_hub: offline, a cached snapshot is used as it is.

A dry run (``download=False``) downloads nothing: it takes the cached snapshot, or lists the
repository on the hub and checks that it has a config and safetensors weights.
"""

from __future__ import annotations

import re
from pathlib import Path

from rlsparsity.analysis.checkpoints import CheckpointError, hub_weight_files, is_hub_id

# What a model needs besides its weights: configs, tokenizers, chat templates.
TOKENIZER_PATTERNS = ["*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja"]
_REVISION = re.compile(r"^[\w./-]+$")


def parse_hub_id(model_id: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of ``org/name[@revision]``; None for anything else."""
    repo, _, revision = model_id.partition("@")
    if "/" not in repo or not is_hub_id(repo) or (revision and not _REVISION.match(revision)):
        return None
    return repo, revision or None


def snapshot_revision(path: Path) -> str | None:
    """The commit of a hub snapshot directory (``.../models--org--name/snapshots/<sha>``), else None."""
    path = Path(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.name
    return None


def resolve_hub_model(model_id: str, *, download: bool = True) -> Path:
    """The local snapshot of hub model ``model_id``, downloaded unless cached (or, with
    ``download=False``, where it would be). Raises ValueError naming the model and what to do."""
    parsed = parse_hub_id(model_id)
    if parsed is None:
        raise ValueError(f"{model_id!r} is not a hub model id (org/name or org/name@revision)")
    repo, revision = parsed
    import huggingface_hub as hf
    from huggingface_hub import errors

    try:
        if not download:
            return _listed(repo, revision)
        meta = Path(hf.snapshot_download(repo, revision=revision, allow_patterns=TOKENIZER_PATTERNS))
        # The second call names the commit the first resolved: a push in between changes nothing.
        weights = hub_weight_files(repo, meta.name, meta, f"model {model_id!r}")
        path = Path(hf.snapshot_download(repo, revision=meta.name, allow_patterns=[*weights, *TOKENIZER_PATTERNS]))
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError) as e:
        raise ValueError(f"cannot resolve model {model_id!r} on the Hugging Face hub: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - offline, unreachable, incomplete cache: one answer
        raise ValueError(_unreachable(model_id, repo, e)) from None
    _check_snapshot(model_id, path)
    return path


def _listed(repo: str, revision: str | None) -> Path:
    """A dry run's answer: the cached snapshot, else the hub's listing of the repo (no download)."""
    import huggingface_hub as hf
    from huggingface_hub import constants, errors
    from huggingface_hub.file_download import repo_folder_name

    try:
        path = Path(hf.snapshot_download(repo, revision=revision, allow_patterns=["config.json"], local_files_only=True))
        if (path / "config.json").is_file():
            return path
    except errors.LocalEntryNotFoundError:
        pass
    listing = hf.snapshot_download(repo, revision=revision, dry_run=True)
    names = [f.filename for f in listing]
    if "config.json" not in names:
        raise CheckpointError(f"model '{repo}': hub repo {repo} has no config.json")
    if not any(n.endswith(".safetensors") for n in names):
        raise CheckpointError(f"model '{repo}': hub repo {repo} has no safetensors weights (pickle checkpoints are refused)")
    commit = listing[0].commit_hash
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots" / commit


def _check_snapshot(model_id: str, path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ValueError(f"model {model_id!r}: the snapshot {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"model {model_id!r}: the snapshot {path} has no safetensors weights "
                         "(pickle checkpoints are refused)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unreachable(model_id: str, repo: str, e: BaseException) -> str:
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the hub did not answer ({type(e).__name__}: {_first_line(e)})"
    return (
        f"cannot resolve model {model_id!r}: {why}, and no complete snapshot of it is in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}). Download it where the hub is reachable, into that cache (HF_HOME / HF_HUB_CACHE): "
        f"`hf download {repo} --include '*.safetensors' '*.json' 'tokenizer.model' '*.jinja'`, "
        f"or give model: a local model directory"
    )
