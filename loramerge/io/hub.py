"""The Hugging Face Hub: Hub ids as sources, downloads of only the files needed, and pushes.

A Hub source is spelled ``org/name``, ``org/name@revision`` or ``org/name/sub/folder[@revision]``
(PEFT saves non-default adapters into subfolders); a single file such as
``org/name/lora.safetensors`` works too. The revision goes last because a revision may itself
contain slashes (``refs/pr/3``).

Everything goes through ``huggingface_hub``: downloads land in its normal cache, and
``HF_HUB_OFFLINE``, ``HF_TOKEN`` and ``HF_ENDPOINT`` are honoured. They are read when a call is
made, not when the client was imported, so a program may set them late. Pushing uses the client's
own ``create_repo`` + ``upload_folder``/``create_commit``, so large files take its normal LFS/Xet
path. Client exceptions become one-line :class:`~loramerge.errors.LoramergeError` messages that
never contain a token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from loramerge.errors import HubError, LoramergeError, SourceNotFound

_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?P<sub>(?:/[^@/\s]+)*)(?:@(?P<revision>[^@\s]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# A subpath with one of these suffixes names a file (a single-file LoRA), anything else a folder.
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_TRUE = {"1", "ON", "YES", "TRUE"}

# The files of an adapter folder: PEFT's two, single-file LoRAs beside them, and the model card
# (for the license). Files in deeper folders (other adapters of the same repo) are left alone.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.safetensors", "README.md")
# The files of a model: configs, safetensors weights and their index, tokenizer files; no pickles.
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*", "README.md")


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub source: repository, optional revision, optional folder or file inside it.

    Example:
        >>> ref = parse_hub_id("org/name/checkpoint-500@v1")
        >>> ref.repo_id, ref.subpath, ref.revision, str(ref)
        ('org/name', 'checkpoint-500', 'v1', 'org/name/checkpoint-500@v1')
    """

    repo_id: str
    revision: str | None = None
    subpath: str | None = None

    def __post_init__(self) -> None:
        problem = hub_ref_problem(self.repo_id, self.revision, self.subpath)
        if problem is not None:
            from loramerge.errors import InvalidParameter

            raise InvalidParameter(f"{self.repo_id}{'/' + self.subpath if self.subpath else ''}"
                                   f"{'@' + self.revision if self.revision else ''}: not a valid Hub reference "
                                   f"({problem})")

    @property
    def is_file(self) -> bool:
        """True when ``subpath`` names a single weights file rather than a folder."""
        return bool(self.subpath) and self.subpath.lower().endswith(FILE_SUFFIXES)  # type: ignore[union-attr]

    def __str__(self) -> str:
        sub = f"/{self.subpath}" if self.subpath else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{sub}{rev}"


def parse_hub_id(text: str) -> HubRef | None:
    """The :class:`HubRef` spelled by ``text``, or None when it cannot be a Hub id.

    Example:
        >>> parse_hub_id("org/name@refs/pr/3").revision
        'refs/pr/3'
        >>> parse_hub_id("./adapters/math") is None, parse_hub_id("math") is None
        (True, True)
    """
    match = _HUB_ID.fullmatch(str(text).strip())
    if match is None:
        return None
    sub = match["sub"].strip("/") or None
    if hub_ref_problem(match["repo"], match["revision"], sub) is not None:
        return None
    return HubRef(repo_id=match["repo"], revision=match["revision"], subpath=sub)


def not_a_hub_id(text: str) -> str:
    """The end of a "no such file" message for ``text``: why it is not a Hub id either, when it looks like one.

    Example:
        >>> not_a_hub_id("org/name@../../etc")
        " (and not a valid Hub id: the revision '../../etc' is not a valid branch, tag or commit name)"
        >>> not_a_hub_id("./local")
        ''
    """
    match = _HUB_ID.fullmatch(str(text).strip())
    if match is None:
        return ""
    problem = hub_ref_problem(match["repo"], match["revision"], match["sub"].strip("/") or None)
    return f" (and not a valid Hub id: {problem})" if problem else ""


_BAD_REVISION = re.compile(r"\.\.|//|@\{|[\x00-\x20\x7f~^:?*\[\\]|^[/.]|/\.|[/.]$|\.lock(?:/|$)")


def hub_ref_problem(repo_id: str, revision: str | None, subpath: str | None) -> str | None:
    """Why these parts cannot name something on the Hub (path traversal, bad names), or None.

    Repository names follow the Hub's rules (no ``--`` or ``..``); a subfolder has no empty,
    ``.`` or ``..`` parts and no backslashes; a revision follows git's ref-name rules, so none of
    them can step outside the repository or the local cache.

    Example:
        >>> hub_ref_problem("org/name", "../../etc", None)
        "the revision '../../etc' is not a valid branch, tag or commit name"
        >>> hub_ref_problem("org/name", "refs/pr/3", "adapters/math") is None
        True
    """
    if not re.fullmatch(rf"{_NAME}/{_NAME}", repo_id or "") or ".." in repo_id or "--" in repo_id:
        return f"{repo_id!r} is not a repository id of the form org/name"
    if subpath is not None:
        parts = subpath.split("/")
        if any(p in ("", ".", "..") for p in parts) or "\\" in subpath or any(ord(c) < 32 for c in subpath):
            return f"the subfolder {subpath!r} may not have empty, '.' or '..' parts, backslashes or control characters"
    if revision is not None and (not revision or len(revision) > 255 or _BAD_REVISION.search(revision)):
        return f"the revision {revision!r} is not a valid branch, tag or commit name"
    return None


@dataclass(frozen=True)
class HubSnapshot:
    """Files of one Hub commit in the local cache: ``root`` is the snapshot folder."""

    ref: HubRef
    root: Path
    commit: str | None

    @property
    def path(self) -> Path:
        """The folder or file the reference points at, inside the snapshot."""
        return self.root / self.ref.subpath if self.ref.subpath else self.root

    def origin(self) -> dict[str, Any]:
        """The provenance recorded on an :class:`~loramerge.core.adapter.Adapter` loaded from here."""
        info: dict[str, Any] = {"repo_id": self.ref.repo_id, "revision": self.ref.revision, "commit": self.commit}
        if self.ref.subpath:
            info["subpath"] = self.ref.subpath
        license_ = card_metadata(self.root / "README.md").get("license")
        if license_:
            info["license"] = license_
        return {k: v for k, v in info.items() if v is not None}


def endpoint() -> str:
    """The Hub endpoint in use: ``HF_ENDPOINT`` as set now, else the client's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (now, or when the client was imported)."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def download_from_hub(repo_id: str, *, revision: str | None = None, subfolder: str | None = None,
                      allow_patterns: Sequence[str] | None = None, ignore_patterns: Sequence[str] | None = None,
                      token: str | bool | None = None) -> HubSnapshot:
    """Download the files of ``repo_id`` that match ``allow_patterns`` into the Hugging Face cache.

    Patterns are relative to ``subfolder`` when it is given (``README.md`` always means the
    repository's own card). In offline mode the cache alone is used. The returned snapshot knows
    the commit the revision resolved to. Fetching adapters and base models both go through here.

    Example (no network: the repository is not in the cache and offline mode is on):
        >>> import os
        >>> os.environ["HF_HUB_OFFLINE"] = "1"
        >>> try:
        ...     download_from_hub("loramerge-example/missing", allow_patterns=["*.json"])
        ... except HubError as e:
        ...     print(str(e).split(";")[0])
        ... finally:
        ...     _ = os.environ.pop("HF_HUB_OFFLINE")
        loramerge-example/missing: not in the local Hugging Face cache and HF_HUB_OFFLINE is set
    """
    from huggingface_hub import snapshot_download

    ref = HubRef(repo_id, revision, subfolder.strip("/") if subfolder else None)
    prefix = f"{ref.subpath}/" if ref.subpath else ""
    allow = [p if p == "README.md" else prefix + p for p in allow_patterns] if allow_patterns else None
    ignore = [prefix + p for p in ignore_patterns] if ignore_patterns else None
    offline = is_offline()
    with hub_errors(ref, token=token):
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=allow, ignore_patterns=ignore, token=token,
            local_files_only=offline, endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    root = Path(folder)
    return HubSnapshot(ref=ref, root=root, commit=root.name if _COMMIT.fullmatch(root.name) else None)


def fetch_adapter(ref: HubRef, *, token: str | bool | None = None) -> HubSnapshot:
    """Download only the adapter files ``ref`` points at and check they are there.

    A folder reference fetches PEFT's files and the single-file LoRAs directly inside it (not
    those of nested folders); a file reference fetches that file and an ``adapter_config.json``
    beside it. The repository's ``README.md`` comes too, for its license.
    """
    if ref.is_file:
        sub = PurePosixPath(ref.subpath)  # type: ignore[arg-type]
        folder = "" if str(sub.parent) == "." else f"{sub.parent}/"
        snapshot = download_from_hub(
            ref.repo_id, revision=ref.revision, token=token,
            allow_patterns=[str(sub), f"{folder}adapter_config.json", "README.md"],
        )
        snapshot = HubSnapshot(ref, snapshot.root, snapshot.commit)
    else:
        snapshot = download_from_hub(
            ref.repo_id, revision=ref.revision, subfolder=ref.subpath, token=token,
            allow_patterns=ADAPTER_FILES, ignore_patterns=["*/*"],
        )
    where = f"{ref.repo_id}@{snapshot.commit[:12] if snapshot.commit else ref.revision or 'main'}"
    path = snapshot.path
    if ref.is_file and not path.is_file():
        raise SourceNotFound(f"{ref}: {where} has no file {ref.subpath}")
    if not ref.is_file and not (path.is_dir() and any(p.is_file() and p.name != "README.md" for p in path.iterdir())):
        inside = f"folder {ref.subpath}" if ref.subpath else "its root folder"
        raise SourceNotFound(
            f"{ref}: {where} has no adapter files (adapter_config.json, *.safetensors) in {inside}"
        )
    return snapshot


def fetch_model(ref: HubRef, *, token: str | bool | None = None) -> HubSnapshot:
    """Download a base model's configs, safetensors weights and tokenizer files (for a fold).

    Example (offline with an empty cache):
        >>> import os
        >>> os.environ["HF_HUB_OFFLINE"] = "1"
        >>> try:
        ...     fetch_model(HubRef("loramerge-example/base"))
        ... except LoramergeError as e:
        ...     print(type(e).__name__)
        ... finally:
        ...     _ = os.environ.pop("HF_HUB_OFFLINE")
        HubError
    """
    snapshot = download_from_hub(
        ref.repo_id, revision=ref.revision, subfolder=ref.subpath, token=token,
        allow_patterns=MODEL_FILES, ignore_patterns=["*/*"],
    )
    if not (snapshot.path / "config.json").is_file():
        raise SourceNotFound(f"{ref}: no config.json in {'folder ' + ref.subpath if ref.subpath else 'the repository'}")
    return snapshot


_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})"
                       r"(?:/(?P<sub>[^/].*?))?/?$")


def model_origin(folder: str | Path) -> dict[str, Any]:
    """Where a base model folder came from: the Hub repository, commit and subfolder when it lies in
    the Hugging Face cache (fold and extract download Hub models there), else its local path; plus
    the license its card declares.

    Example:
        >>> model_origin("/c/hub/models--org--base/snapshots/" + "a" * 40 + "/sub")["repo_id"]
        'org/base'
        >>> sorted(model_origin("/data/llama"))
        ['path']
    """
    text = Path(folder).as_posix()
    match = _SNAPSHOT.search(text)
    if match is None:
        info: dict[str, Any] = {"path": str(Path(folder).resolve())}
        readme = Path(folder) / "README.md"
    else:
        info = {"repo_id": f"{match['org']}/{match['name']}", "commit": match["commit"]}
        if match["sub"]:
            info["subpath"] = match["sub"]
        readme = Path(text[: match.end("commit")]) / "README.md"
    license_ = card_metadata(readme).get("license")
    if license_:
        info["license"] = license_
    return info


def card_metadata(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a model card (``README.md``), or ``{}`` when there is none.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "README.md"
        >>> _ = p.write_text("---\\nlicense: mit\\n---\\n# hi\\n")
        >>> card_metadata(p)["license"]
        'mit'
    """
    from loramerge.io.structured import parse_yaml, read_text

    try:
        text = read_text(readme)
    except LoramergeError:
        return {}
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.DOTALL)
    if not match:
        return {}
    try:
        data = parse_yaml(match.group(1), name=str(readme))
    except LoramergeError:
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- errors


@contextmanager
def hub_errors(ref: HubRef | str, *, token: str | bool | None = None, pushing: bool = False) -> Iterator[None]:
    """Turn the client's exceptions into one-line loramerge errors, with any token redacted."""
    try:
        yield
    except LoramergeError:
        raise
    except Exception as exc:
        raise _translate(exc, ref, pushing=pushing).with_traceback(None) from None


def redact(text: str, token: str | bool | None = None) -> str:
    """``text`` with the active token (and anything shaped like a Hub token) replaced by ``***``.

    Example:
        >>> redact("Bearer hf_abcdefghijklmnopqrstuvwxyz0123 was refused")
        'Bearer *** was refused'
    """
    secrets = {t for t in (token if isinstance(token, str) else None, _active_token()) if t and len(t) >= 4}
    for secret in secrets:
        text = text.replace(secret, "***")
    return re.sub(r"\bhf_[A-Za-z0-9]{16,}\b", "***", text)


def _active_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:
        return None


def _translate(exc: BaseException, ref: HubRef | str, *, pushing: bool) -> LoramergeError:
    import httpx2
    from huggingface_hub import errors as hf

    name = str(ref)
    repo = ref.repo_id if isinstance(ref, HubRef) else name
    login = "set HF_TOKEN or log in with `hf auth login`"
    status = _status(exc)
    message: str
    kind: type[LoramergeError] = HubError
    if isinstance(exc, hf.GatedRepoError):
        message, kind = f"{name}: {repo} is a gated repository; accept its terms on the Hub, then {login}", SourceNotFound
    elif isinstance(exc, hf.RepositoryNotFoundError):
        kind = SourceNotFound
        if pushing:
            message = f"{name}: the Hub refused access to {repo}; it may belong to someone else ({login} as its owner)"
        else:
            message = (f"{name}: no such local file or folder, and no Hub repository {repo} that these credentials "
                       f"can see (if it is private or gated, {login})")
    elif isinstance(exc, hf.RevisionNotFoundError):
        revision = ref.revision if isinstance(ref, HubRef) else None
        message, kind = (f"{name}: {repo} has no revision {revision or 'main'!r} (give a branch, tag or commit hash)",
                         SourceNotFound)
    elif isinstance(exc, hf.RemoteEntryNotFoundError):
        message, kind = f"{name}: the file is not in {repo}", SourceNotFound
    elif isinstance(exc, hf.OfflineModeIsEnabled) or (
        isinstance(exc, hf.LocalEntryNotFoundError) and is_offline()
    ):
        message = (f"{name}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it once "
                   "online or unset HF_HUB_OFFLINE")
    elif status == 401:
        message = (f"{name}: the Hub at {endpoint()} refused the credentials (401); check HF_TOKEN or log in "
                   "again with `hf auth login`")
    elif status == 403:
        message = (f"{name}: the token has no write access to {repo} (403); use a token with write rights"
                   if pushing else f"{name}: access to {repo} is forbidden for these credentials (403)")
    elif status is not None:
        message = f"{name}: the Hub at {endpoint()} answered {status} ({_first_line(exc)})"
    elif _is_connection_error(exc, httpx2):
        where = "" if pushing else " and it is not in the local cache"
        message = (f"{name}: cannot reach the Hub at {endpoint()}{where}; check the network connection, "
                   "HF_ENDPOINT or the proxy settings")
    elif isinstance(exc, hf.LocalEntryNotFoundError):
        message = f"{name}: cannot fetch it from the Hub at {endpoint()} and it is not in the local cache"
    elif isinstance(exc, (ValueError, hf.HFValidationError)):
        message, kind = f"{name}: not a valid Hub repository id ({_first_line(exc)})", SourceNotFound
    else:
        message = f"{name}: {type(exc).__name__}: {_first_line(exc)}"
    return kind(redact(message), path=name)


def _status(exc: BaseException) -> int | None:
    for e in _chain(exc):
        response = getattr(e, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def _is_connection_error(exc: BaseException, httpx2: Any) -> bool:
    kinds = (httpx2.ConnectError, httpx2.TimeoutException, httpx2.RemoteProtocolError, ConnectionError)
    return any(isinstance(e, kinds) for e in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


# --------------------------------------------------------------------------- pushing


@dataclass(frozen=True)
class PushResult:
    """Where a push landed: the repository, the new commit and its URL."""

    repo_id: str
    commit: str | None
    url: str | None


def check_push(repo_id: str, *, token: str | None = None) -> str:
    """Refuse a push that cannot work before any heavy work: a bad target, no token, offline mode.

    Returns the token to use. Commands call it before merging, so a missing login fails fast.

    Example:
        >>> try:
        ...     check_push("org/name/sub")
        ... except LoramergeError as e:
        ...     print(e)
        org/name/sub: a push target must be a Hub repository id, org/name
    """
    ref = parse_hub_id(repo_id)
    if ref is None or ref.revision or ref.subpath:
        from loramerge.errors import InvalidParameter

        raise InvalidParameter(f"{repo_id}: a push target must be a Hub repository id, org/name")
    token = token or _active_token()
    if not token:
        raise HubError(f"{repo_id}: pushing needs a token with write access; set HF_TOKEN or log in with "
                       "`hf auth login`")
    if is_offline():
        raise HubError(f"{repo_id}: cannot push while HF_HUB_OFFLINE is set")
    return token


def push_to_hub(folder_or_file: str | Path, repo_id: str, *, private: bool = False, commit_message: str | None = None,
                token: str | None = None, extra_files: Mapping[str, bytes] | None = None) -> PushResult:
    """Upload a folder (or one file) to the model repository ``repo_id``, creating it if needed.

    The client's own ``create_repo`` and ``upload_folder`` (or ``create_commit`` when
    ``extra_files`` add or replace files such as the model card) do the work, so large files take
    its normal LFS/Xet path. ``private`` applies when the repository is created. The token is
    ``token``, else ``HF_TOKEN`` or the saved login; without one nothing is sent.

    Example (a target with a revision is refused before any request):
        >>> import tempfile
        >>> try:
        ...     push_to_hub(tempfile.mkdtemp(), "me/merged@v1")
        ... except LoramergeError as e:
        ...     print(e)
        me/merged@v1: a push target must be a Hub repository id, org/name
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    path = Path(folder_or_file)
    if not path.exists():
        raise SourceNotFound(f"{path}: no such file or folder to push")
    if path.is_dir():
        from loramerge.io.checkpoint import iter_folder_files

        # Only regular files inside the folder are published: never /proc, a device, or a link out of it.
        for _ in iter_folder_files(path):
            pass
    token = check_push(repo_id, token=token)
    message = commit_message or f"Upload {path.name} with loramerge"
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    with hub_errors(HubRef(repo_id), token=token, pushing=True):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if path.is_dir() and not extra_files:
            info = api.upload_folder(folder_path=str(path), repo_id=repo_id, commit_message=message)
        else:
            extra = dict(extra_files or {})
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            operations = []
            for file in files:
                name = file.name if path.is_file() else file.relative_to(path).as_posix()
                if name not in extra and not any(part.startswith(".") for part in name.split("/")):
                    operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(file)))
            operations += [CommitOperationAdd(path_in_repo=k, path_or_fileobj=v) for k, v in extra.items()]
            info = api.create_commit(repo_id, operations=operations, commit_message=message)
    return PushResult(repo_id=repo_id, commit=getattr(info, "oid", None), url=getattr(info, "commit_url", None))
