"""Upload of saved models and training states to the Hugging Face Hub (kohya's ``--huggingface_*`` options).

With ``--huggingface_repo_id`` every save of the run (model file or diffusers folder) is uploaded after it was
written locally to ``<--huggingface_path_in_repo>/<its name>`` (the repository root without a path); with
``--save_state_to_huggingface`` every training-state folder too. The repository is created on the first upload
when it does not exist, private unless ``--huggingface_repo_visibility public``. ``--async_upload`` runs the
uploads in one background thread, in order, so training goes on meanwhile; the final model is uploaded
synchronously and the run waits for every pending upload before it ends.

A failing upload (Hub unreachable, no permission, ...) is one error line in the log: the local save is
written first and always kept. ``HF_ENDPOINT`` (read when the run starts) points uploads at another Hub.
The token is passed to huggingface_hub only: never logged, never written to a file.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from library.option_groups import HubOptions
from library.training.hub_resume import REPO_TYPES, parse_resume_spec

logger = logging.getLogger(__name__)


def add_huggingface_arguments(parser: argparse.ArgumentParser) -> None:
    """``--huggingface_repo_id``, ``--huggingface_repo_type``, ``--huggingface_path_in_repo``,
    ``--huggingface_token``, ``--huggingface_repo_visibility``, ``--save_state_to_huggingface``,
    ``--resume_from_huggingface``, ``--async_upload`` (kohya's names and defaults)."""
    g = parser.add_argument_group("Hugging Face upload (docs/train_network.md)")
    a = g.add_argument
    a("--huggingface_repo_id", type=str, default=None,
      help="upload every saved model to this Hub repository (<owner>/<name>; created if missing)")
    a("--huggingface_repo_type", type=str, default=None, help="repository type: model (default), dataset or space")
    a("--huggingface_path_in_repo", type=str, default=None,
      help="folder in the repository the saves go to (default: its root)")
    a("--huggingface_token", type=str, default=None,
      help="Hub access token (default: the saved login or HF_TOKEN; never written to files)")
    a("--huggingface_repo_visibility", type=str, default=None,
      help="visibility of a repository this run creates: public, anything else private (default private)")
    a("--save_state_to_huggingface", action="store_true", help="also upload every saved training state folder")
    a("--resume_from_huggingface", action="store_true",
      help="--resume names a state in a Hub repository: <owner>/<repo>/<path>[:<revision>[:<repo type>]]")
    a("--async_upload", action="store_true",
      help="upload in a background thread while training goes on (the run waits for them at its end)")


def huggingface_problems(args: argparse.Namespace) -> list[str]:
    """Combinations of the Hub options that cannot work (checked before anything is loaded)."""
    problems = []
    repo_id, repo_type = args.huggingface_repo_id, args.huggingface_repo_type
    if repo_type is not None and repo_type not in REPO_TYPES:
        problems.append(f"--huggingface_repo_type {repo_type}: expected one of {', '.join(REPO_TYPES)}")
    if repo_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            problems.append(f"--huggingface_repo_id {repo_id}: not a Hub repository id (expected <owner>/<name> "
                            "of letters, digits, '-', '_', '.')")
    if args.save_state_to_huggingface and not repo_id:
        problems.append("--save_state_to_huggingface needs --huggingface_repo_id (the repository to upload to)")
    if args.resume_from_huggingface:
        if not args.resume:
            problems.append("--resume_from_huggingface needs --resume <owner>/<repo>/<path>[:<revision>[:<type>]]")
        else:
            try:
                parse_resume_spec(args.resume)
            except ValueError as exc:
                problems.append(f"--resume {args.resume} (--resume_from_huggingface): {exc}")
    return problems


@dataclass(frozen=True)
class HubTarget:
    """Where uploads go: repository, its type, the folder inside it, visibility of a new repository."""

    repo_id: str
    repo_type: str | None = None
    path_in_repo: str | None = None
    private: bool = True
    token: str | None = field(default=None, repr=False)
    endpoint: str | None = None  # None: huggingface_hub's default (HF_ENDPOINT at import, else huggingface.co)

    def destination(self, name: str) -> str:
        """The path in the repository of a save named ``name``."""
        folder = (self.path_in_repo or "").strip("/")
        return f"{folder}/{name}" if folder else name


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _stage(path: Path) -> tuple[Path, Path | None]:
    """Hard links of ``path`` (a file or folder) in a temporary beside it, so a queued upload still finds its
    files after ``--save_last_n_*`` removed or a later save replaced them. Returns ``(what to upload, the
    temporary to delete afterwards)``; ``(path, None)`` where the file system has no hard links."""
    from library.fileio import temp_prefix

    scratch = None
    try:
        scratch = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent))
        staged = scratch / path.name
        if path.is_dir():
            shutil.copytree(path, staged, copy_function=os.link)
        else:
            os.link(path, staged)
        return staged, scratch
    except OSError:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        return path, None


class HubUploader:
    """Uploads saves to one :class:`HubTarget`, inline or (``asynchronous``) in one background thread."""

    def __init__(self, target: HubTarget, *, asynchronous: bool = False, states: bool = False):
        """``states``: also upload training-state folders (``--save_state_to_huggingface``)."""
        self.target, self.asynchronous, self.states = target, asynchronous, states
        self.repo_ready = False
        self.uploaded: list[str] = []  # destinations uploaded so far, in order
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None

    def upload(self, path: Path, *, wait: bool = False) -> None:
        """Upload a saved model file or folder; ``wait`` blocks until it (and any queued before it) is done."""
        self._submit(Path(path), wait=wait)

    def upload_state(self, folder: Path, *, wait: bool = False) -> None:
        """Upload a training-state folder when ``states`` is set."""
        if self.states:
            self._submit(Path(folder), wait=wait)

    def finish(self) -> None:
        """Wait for every pending upload and stop the background thread."""
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = self._queue = None

    # ---- internals ----------------------------------------------------------------------------

    def _submit(self, path: Path, *, wait: bool) -> None:
        if not self.asynchronous:
            self._send(path, path)
            return
        if self._worker is None:
            self._queue = queue.Queue()
            self._worker = threading.Thread(target=self._work, name="hub-upload", daemon=True)
            self._worker.start()
        source, scratch = _stage(path)
        self._queue.put((path, source, scratch))
        if wait:
            self._queue.join()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                path, source, scratch = item
                try:
                    self._send(path, source)
                finally:
                    if scratch is not None:
                        shutil.rmtree(scratch, ignore_errors=True)
            finally:
                self._queue.task_done()

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.target.endpoint, token=self.target.token)

    def _ensure_repo(self, api, path: Path) -> bool:
        """Create the repository when it does not exist yet; False when the Hub cannot be reached."""
        if self.repo_ready:
            return True
        from huggingface_hub.errors import HfHubHTTPError

        t = self.target
        try:
            api.repo_info(t.repo_id, repo_type=t.repo_type)
            self.repo_ready = True
            return True
        except HfHubHTTPError:
            pass  # not found (or not visible with this token): try to create it
        except Exception as exc:  # noqa: BLE001 - connection refused, offline mode, timeouts, ...
            logger.error("Hugging Face upload of %s skipped: cannot reach the Hub for %s (%s); the local save is "
                         "kept", path, t.repo_id, _one_line(exc))
            return False
        try:
            api.create_repo(t.repo_id, repo_type=t.repo_type, private=t.private, exist_ok=True)
            logger.info("created the %s Hugging Face repository %s", "private" if t.private else "public", t.repo_id)
            self.repo_ready = True
        except Exception as exc:  # noqa: BLE001 - e.g. no permission: the upload below says what happens
            logger.error("cannot create the Hugging Face repository %s (%s)", t.repo_id, _one_line(exc))
        return True

    def _send(self, path: Path, source: Path) -> None:
        """Upload ``source`` (``path`` or its staged copy) under ``path``'s name; errors become one log line."""
        t = self.target
        dest = t.destination(path.name)
        try:
            api = self._api()
            if not self._ensure_repo(api, path):
                return
            if source.is_dir():
                api.upload_folder(repo_id=t.repo_id, repo_type=t.repo_type, folder_path=str(source),
                                  path_in_repo=dest)
            else:
                api.upload_file(repo_id=t.repo_id, repo_type=t.repo_type, path_or_fileobj=str(source),
                                path_in_repo=dest)
        except Exception as exc:  # noqa: BLE001 - an upload never stops training; the local save is kept
            logger.error("Hugging Face upload of %s to %s failed (%s); the local save is kept", path, t.repo_id,
                         _one_line(exc))
            return
        self.uploaded.append(dest)
        logger.info("uploaded %s to Hugging Face %s:%s", path.name, t.repo_id, dest)


def make_uploader(hub: HubOptions) -> HubUploader | None:
    """The run's uploader from the ``--huggingface_*`` options, ``--save_state_to_huggingface`` and
    ``--async_upload`` (None without ``--huggingface_repo_id``)."""
    if not hub.huggingface_repo_id:
        return None
    target = HubTarget(repo_id=hub.huggingface_repo_id, repo_type=hub.huggingface_repo_type,
                       path_in_repo=hub.huggingface_path_in_repo, token=hub.huggingface_token,
                       private=hub.huggingface_repo_visibility != "public",
                       endpoint=os.environ.get("HF_ENDPOINT") or None)
    return HubUploader(target, asynchronous=hub.async_upload, states=hub.save_state_to_huggingface)
