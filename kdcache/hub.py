"""Hugging Face Hub ids wherever kdcache takes a model, a tokenizer or a text source.

`--teacher`, `--student`, `--online-teacher`, `--source` and `--tokenizer` take a local
path or a Hub id, `owner/name` or `owner/name@revision`: a reference that is no existing
local path and that huggingface_hub's own validator accepts as a repo id. A local path
always wins, so a directory `models/tiny` that exists is read from disk.

An id resolves to its snapshot directory in the Hugging Face cache (`HF_HUB_CACHE`):
downloaded where there is a network, read from the cache where there is none
(`HF_HUB_OFFLINE=1`, or the Hub cannot be reached). Only what kdcache reads is fetched:
safetensors weights, configs and tokenizer files, never `*.bin` pickles; kdcache never
runs a repository's code. huggingface_hub reads its environment when first imported and
is imported here only inside the functions: building the command line stays light, and
this root module imports no kdcache package but the errors.
"""

from __future__ import annotations

from pathlib import Path

from kdcache.errors import HubError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
"""A model's tokenizer and the files that say how to use it (special tokens, chat template)."""
MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES)
RECORD_SUFFIXES = (".parquet", ".jsonl", ".arrow")
DATASET_FILES = (*(f"*{suffix}" for suffix in RECORD_SUFFIXES), "*.json")
"""Record files prepare reads, and the JSON beside them (a `datasets` save_to_disk
directory's dataset_info.json and state.json, a DatasetDict's dataset_dict.json)."""


def is_hub_id(ref: str) -> bool:
    """Whether `ref` names a Hub repository rather than a local path: it does not exist
    here and reads as `owner/name[@revision]` to huggingface_hub's validator."""
    if not ref or Path(ref).exists():
        return False
    repo, at, revision = ref.partition("@")
    if repo.count("/") != 1 or (at and not revision):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def resolve_model(ref: str, flag: str) -> str:
    """A model directory: `ref` itself when it exists, else the snapshot of Hub id `ref`
    (config, safetensors weights and tokenizer files)."""
    if Path(ref).exists():
        return ref
    _check_id(ref, flag)
    path = Path(_snapshot(ref, flag, "model", MODEL_FILES))
    if not (path / "config.json").is_file():
        raise HubError(f"{flag} {ref}: the repository has no config.json (not a transformers model)")
    if not any(path.glob("*.safetensors")):
        raise HubError(f"{flag} {ref}: the repository has no *.safetensors weights (kdcache never loads "
                       "*.bin pickles)")
    return str(path)


def resolve_tokenizer(ref: str, flag: str) -> str:
    """The tokenizer.json of `ref`: a tokenizer.json file, a directory holding one, or a
    Hub id whose tokenizer files (not its weights) are fetched."""
    path = Path(ref)
    if path.is_file():
        return ref
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise HubError(f"{ref}: no tokenizer.json in the directory ({flag})")
        return str(path / "tokenizer.json")
    _check_id(ref, flag, what="tokenizer file")
    found = Path(_snapshot(ref, flag, "model", TOKENIZER_FILES)) / "tokenizer.json"
    if not found.is_file():
        raise HubError(f"{flag} {ref}: the repository has no tokenizer.json (a fast tokenizer)")
    return str(found)


def resolve_dataset(ref: str, flag: str) -> str:
    """A text source: `ref` as given unless it is a Hub id (a name such as `stdlib`, a
    glob or a missing path is left for the source reader to judge), else the dataset
    repository's snapshot directory, which prepare reads as a directory of record files."""
    if not is_hub_id(ref):
        return ref
    path = _snapshot(ref, flag, "dataset", DATASET_FILES)
    if not any(p.suffix in RECORD_SUFFIXES for p in Path(path).rglob("*")):
        raise HubError(f"{flag} {ref}: the Hugging Face dataset has no {', '.join(RECORD_SUFFIXES)} files")
    return path


def _check_id(ref: str, flag: str, what: str = "file or directory") -> None:
    if not is_hub_id(ref):
        raise HubError(f"{ref}: no such {what} ({flag}), and not a Hugging Face Hub id (owner/name)")


def _snapshot(ref: str, flag: str, repo_type: str, patterns: tuple[str, ...]) -> str:
    """The snapshot directory of Hub id `ref`, or one line saying why there is none."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = ref.partition("@")
    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        path = snapshot_download(repo, repo_type=repo_type, revision=revision or None,
                                 allow_patterns=list(patterns), local_files_only=constants.HF_HUB_OFFLINE)
        return str(path)
    except LocalEntryNotFoundError as exc:
        fetch = f"hf download {repo}" + (" --repo-type dataset" if kind == "dataset" else "")
        if revision:
            fetch += f" --revision {revision}"
        if constants.HF_HUB_OFFLINE:
            why, fix = "HF_HUB_OFFLINE=1", "set HF_HUB_OFFLINE=0 with a network"
        else:
            why, fix = f"the Hub cannot be reached: {_first_line(exc)}", "check the network"
        state = "incomplete" if type(exc).__name__ == "IncompleteSnapshotError" else "not"
        raise HubError(f"{flag} {ref}: no such local path, and the Hugging Face {kind} is {state} in the "
                       f"cache at {constants.HF_HUB_CACHE} ({why}); {fix}, or fetch it with "
                       f"`{fetch}`") from None
    except GatedRepoError:
        raise HubError(f"{flag} {ref}: the Hugging Face {kind} is gated: accept its terms on the Hub and "
                       "log in (`hf auth login`)") from None
    except RevisionNotFoundError:
        raise HubError(f"{flag} {ref}: the Hugging Face {kind} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{flag} {ref}: no such local path, and no Hugging Face {kind} {repo!r} (or it is "
                       "private: log in with `hf auth login`)") from None
    except HfHubHTTPError as exc:
        raise HubError(f"{flag} {ref}: the Hugging Face Hub refused the download "
                       f"({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
