"""``--resume_from_huggingface``: fetch a training-state folder from a Hugging Face Hub repository to resume from.

``--resume`` then reads ``<owner>/<repo>/<path in repo>[:<revision>[:<repo type>]]`` (kohya's format; a
revision given without a type means a model repository). Every file under that path is downloaded into the
Hugging Face cache (``HF_HUB_CACHE``), and the run resumes from the downloaded folder exactly as from a local
one. Downloaded once per process; the Hub must be reachable (else one error line, exit 2).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from library.errors import UserError
from library.option_groups import HubOptions, SaveOptions

logger = logging.getLogger(__name__)

SPEC_FORMAT = "<owner>/<repo>/<path in repo>[:<revision>[:<repo type>]]"
_DOWNLOADED: dict[tuple[str, str | None], str] = {}  # (spec, endpoint) -> local folder


#: repository types huggingface_hub can upload to and download from
REPO_TYPES = ("model", "dataset", "space")


@dataclass(frozen=True)
class ResumeSource:
    """A state folder in a Hub repository."""

    repo_id: str
    path_in_repo: str
    revision: str | None = None
    repo_type: str | None = None


def parse_resume_spec(spec: str) -> ResumeSource:
    """Split ``--resume`` as kohya does: owner and name, then the path with ``:revision[:repo type]``;
    ValueError saying what is expected otherwise."""
    parts = spec.split("/")
    if len(parts) < 3 or not parts[0] or not parts[1]:
        raise ValueError(f"expected {SPEC_FORMAT}")
    repo_id = f"{parts[0]}/{parts[1]}"
    divided = "/".join(parts[2:]).split(":")
    if len(divided) > 3:
        raise ValueError(f"too many ':' (expected {SPEC_FORMAT})")
    path = divided[0].strip("/")
    if not path:
        raise ValueError(f"no path in the repository (expected {SPEC_FORMAT})")
    revision = (divided[1] or None) if len(divided) > 1 else None
    repo_type = (divided[2] or None) if len(divided) == 3 else ("model" if len(divided) == 2 else None)
    if repo_type is not None and repo_type not in REPO_TYPES:
        raise ValueError(f"repository type {repo_type!r}: expected one of {', '.join(REPO_TYPES)}")
    return ResumeSource(repo_id, path, revision, repo_type)


def download_state(source: ResumeSource, *, token: str | None = None, endpoint: str | None = None) -> Path:
    """Download every file under ``source.path_in_repo`` (kohya: the repository's file list, then one download
    per file) and return the local folder holding them. Problems raise UserError."""
    from huggingface_hub import HfApi, hf_hub_download

    where = f"{source.repo_id}/{source.path_in_repo}" + (f"@{source.revision}" if source.revision else "")
    try:
        info = HfApi(endpoint=endpoint, token=token).repo_info(source.repo_id, revision=source.revision,
                                                               repo_type=source.repo_type)
        prefix = source.path_in_repo
        files = [s.rfilename for s in info.siblings or []
                 if s.rfilename == prefix or s.rfilename.startswith(prefix + "/")]
        if not files:
            raise UserError(f"--resume {where} (--resume_from_huggingface): no files under that path in the "
                            "repository")
        logger.info("downloading the training state %s from Hugging Face (%d files)", where, len(files))
        local = [hf_hub_download(source.repo_id, name, revision=source.revision, repo_type=source.repo_type,
                                 token=token, endpoint=endpoint) for name in files]
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreachable Hub, missing repository, no permission, ...
        lines = str(exc).strip().splitlines()
        raise UserError(f"--resume {where} (--resume_from_huggingface): cannot download it "
                        f"({type(exc).__name__}: {lines[0] if lines else ''})") from None
    root = Path(local[0]).parents[len(PurePosixPath(files[0]).parts) - 1]  # the downloaded snapshot
    return root / prefix


def resume_folder(save: SaveOptions, hub: HubOptions) -> str | None:
    """The local state folder ``--resume`` names: the option itself, or with ``--resume_from_huggingface``
    the downloaded folder (fetched on the first call of the process, with ``--huggingface_token``)."""
    resume = save.resume
    if not resume or not hub.resume_from_huggingface:
        return resume
    endpoint = os.environ.get("HF_ENDPOINT") or None
    key = (resume, endpoint)
    if key not in _DOWNLOADED:
        try:
            source = parse_resume_spec(resume)
        except ValueError as exc:
            raise UserError(f"--resume {resume} (--resume_from_huggingface): {exc}") from None
        _DOWNLOADED[key] = str(download_state(source, token=hub.huggingface_token, endpoint=endpoint))
    return _DOWNLOADED[key]
