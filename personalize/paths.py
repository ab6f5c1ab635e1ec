"""Where the package keeps caches, output checks, and atomic writes."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterable

STALE_AFTER_S = 3600.0  # a leftover temp that names no live process here is stale once untouched this long


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder in the cache (``$PERSONALIZE_CACHE`` or ``~/.cache/personalize``)."""
    root = os.environ.get("PERSONALIZE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "personalize")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def use_compile_cache() -> Path:
    """Keep ``torch.compile``'s artifacts across runs, in ``cache_dir("torch-compile")``, and return the folder.

    Inductor's FX graph cache and the AOT autograd cache (keyed by torch itself: the graph, its inputs' shapes
    and dtypes, the torch version and the inductor config) are turned on and kept under the package cache, so
    a second ``--compile`` run of the same model skips most of the compiling. A ``TORCHINDUCTOR_CACHE_DIR``,
    ``TORCHINDUCTOR_FX_GRAPH_CACHE`` or ``TORCHINDUCTOR_AUTOGRAD_CACHE`` the user set is left as it is."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not folder or folder == default_cache_dir():  # unset, or inductor's own default (it writes it back)
        folder = str(cache_dir("torch-compile"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:
        inductor_config.fx_graph_cache = True
    if "TORCHINDUCTOR_AUTOGRAD_CACHE" not in os.environ:
        functorch_config.enable_autograd_cache = True
    return Path(folder)


def inside(folder: str | os.PathLike, *parts: str) -> Path:
    """``folder / parts...``, refused (one-line BadInputError) when it would land outside ``folder``.

    Every writer that builds a file name from a string it was given (a token, a concept name) goes through
    this, so a name such as ``../../x`` cannot write outside the output folder even if it slipped past the
    checks where names enter (links inside ``folder`` are followed, so they are held to the same rule)."""
    from .errors import BadInputError

    folder = Path(folder)
    for part in parts:
        check_name(Path(part).name)
    path = folder.joinpath(*parts)
    root = folder.resolve()
    if not parts or not path.resolve().is_relative_to(root) or path.resolve() == root:
        raise BadInputError(f"refusing to write {str(Path(*parts)) if parts else ''!r}: the name leaves the output "
                            f"folder '{folder}'; use a plain file name (no '/', '\\' or '..')")
    return path


NAME_MAX = 255  # bytes in one file name (Linux ext4/xfs/btrfs, macOS APFS counts UTF-8 bytes too)
TEMP_EXTRA = 64  # bytes an atomic write's temp name adds: ".NAME.<pid>@<host>.<random>.tmp"
NAME_BYTES_MAX = NAME_MAX - TEMP_EXTRA  # 191: the longest name written here (its temp file must fit too)


def check_name(name: str) -> str:
    """``name`` if it fits in one file name with its temp (:data:`NAME_BYTES_MAX` UTF-8 bytes), else a one-line
    BadInputError: a name built from a token of wide characters (CJK, emoji: 3-4 bytes each) or a long --out
    would otherwise fail half-way through a write with the operating system's 'File name too long'."""
    from .errors import BadInputError

    size = len(str(name).encode("utf-8", "surrogateescape"))
    if size > NAME_BYTES_MAX:
        shown = str(name) if len(str(name)) <= 40 else str(name)[:37] + "..."
        raise BadInputError(f"the file name {shown!r} is {size} bytes (UTF-8), over the {NAME_BYTES_MAX} a name "
                            f"written here may have ({NAME_MAX} per file name, less the temp file's suffix); use a "
                            "shorter name or token")
    return name


# ----------------------------------------------------------------------------------------------- output checks
def check_output(path: str | os.PathLike, *, folder: bool = False, overwrite: bool = True,
                 flag: str = "--out") -> Path:
    """Refuse, before any work, an output that could not be written (one-line BadInputError); returns the path.

    ``folder``: the output is a folder (else a file). Refused: a file where a folder goes or the reverse; a
    path under a regular file; a location this process cannot create files in (probed with a temp file,
    removed at once). ``overwrite=False`` also refuses an existing file, or a folder that is not empty."""
    from .errors import BadInputError

    path = Path(path)
    check_name(path.name)
    if path.exists():
        if folder and not path.is_dir():
            raise BadInputError(f"{flag} '{path}' is a file; pass a folder for the output")
        if not folder and path.is_dir():
            raise BadInputError(f"{flag} '{path}' is a folder; pass a file path")
        if not overwrite and (not folder or any(path.iterdir())):
            refuse_existing([path], flag)
    where = path if path.is_dir() else path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise BadInputError(f"{flag} '{path}' cannot be created: '{where}' is a file, not a folder; "
                            "pass a path in a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".personalize-probe.", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BadInputError(f"{flag} '{path}' cannot be written: no new file can be made in '{where}' "
                            f"({exc.strerror or type(exc).__name__}); pass a folder you can write to") from exc
    return path


def refuse_existing(paths: Iterable[str | os.PathLike], flag: str = "--out") -> None:
    """One-line BadInputError naming the first of ``paths`` that exists (none exist: nothing happens)."""
    from .errors import BadInputError

    found = [Path(p) for p in paths if os.path.lexists(p)]
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise BadInputError(f"{flag}: '{found[0]}'{more} already exists; pass --overwrite to replace it, "
                            f"or choose another {flag}")


# ----------------------------------------------------------------------------------------------- atomic writes
def _owner() -> str:
    """``<pid>@<host>``: who writes a temp file (so a leftover of a killed writer can be told from a live one)."""
    return f"{os.getpid()}@{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())[:32]}"


def _is_stale(entry: os.DirEntry, owner: str | None) -> bool:
    if owner is not None:
        pid, _, host = owner.partition("@")
        if host == _owner().partition("@")[2]:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except (OSError, OverflowError, ValueError):
                return False
            return False
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
    except OSError:
        return False


def _temp_owner(name: str, prefix: str) -> tuple[bool, str | None]:
    """Whether ``name`` is a temp of the target with temp ``prefix`` (``.NAME.``), and its writer (None: unknown)."""
    if not name.startswith(prefix):
        return False, None
    core = name[len(prefix):]
    if core.endswith(".tmp"):  # .NAME.<pid>@<host>.<random>.tmp, or an older .NAME.<random>.tmp
        parts = core[:-4].split(".")
        if len(parts) == 2 and "@" in parts[0]:
            return True, parts[0]
        return len(parts) == 1 and re.fullmatch(r"[a-z0-9_]{8}", parts[0]) is not None, None
    if core.endswith(".old"):  # atomic_dir's moved-away folder: .NAME.<pid>@<host>.old, or an older .NAME.<pid>.old
        part = core[:-4]
        return ("@" in part and "." not in part) or part.isdigit(), part if "@" in part else None
    return False, None


def clean_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove what killed atomic writes of ``target`` left beside it; returns what was removed.

    A temp names its writer (``.NAME.<pid>@<host>.<random>.tmp``): it is stale when that process is gone (a
    writer on this host), or (another host's, or an older temp that names no writer) once untouched for
    ``STALE_AFTER_S``. A live writer's temp is never touched."""
    target = Path(target)
    prefix, removed = f".{target.name}.", []
    try:
        entries = [e for e in os.scandir(target.parent) if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        ours, owner = _temp_owner(entry.name, prefix)
        if not ours or not _is_stale(entry, owner):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{_owner()}."


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    Stale temps of ``target`` left by killed writers are removed first (:func:`clean_stale_temps`)."""
    target = Path(target)
    check_name(target.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_folder_beside(target: Path) -> Path:
    """A new temp folder next to ``target`` (its name checked, stale temps of killed writers removed first)."""
    check_name(target.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = True):
    """Yield a temporary folder beside ``target``; it replaces ``target`` only if the block succeeds.

    With ``replace=False`` a ``target`` that exists when the block ends (another process made it meanwhile)
    is kept and the new folder dropped: the first writer wins, and no reader sees its folder moved away.
    Stale temps of ``target`` left by killed writers are removed first (:func:`clean_stale_temps`).
    """
    target = Path(target)
    tmp = _temp_folder_beside(target)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if not replace:
            try:
                os.rename(tmp, target)  # fails when target exists and is not empty
            except OSError:
                if not target.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            return
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{_owner()}.old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike):
    """Yield an empty temp folder beside ``target``; when the block succeeds, its files move into ``target``
    (created if needed, other files there kept), else none of them reaches ``target``: a write of several files
    (an export) is all or nothing."""
    target = Path(target)
    tmp = _temp_folder_beside(target)
    try:
        yield tmp
        target.mkdir(exist_ok=True)
        for entry in sorted(tmp.iterdir()):
            os.replace(entry, target / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (contiguous CPU copies) to ``path`` atomically, with safetensors ``metadata``."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt", **(metadata or {})})
    return path
