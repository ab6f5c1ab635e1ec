"""Where the package keeps caches, and atomic writes."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder in the cache (``$PERSONALIZE_CACHE`` or ``~/.cache/personalize``)."""
    root = os.environ.get("PERSONALIZE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "personalize")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def inside(folder: str | os.PathLike, *parts: str) -> Path:
    """``folder / parts...``, refused (one-line BadInputError) when it would land outside ``folder``.

    Every writer that builds a file name from a string it was given (a token, a concept name) goes through
    this, so a name such as ``../../x`` cannot write outside the output folder even if it slipped past the
    checks where names enter (links inside ``folder`` are followed, so they are held to the same rule)."""
    from .errors import BadInputError

    folder = Path(folder)
    path = folder.joinpath(*parts)
    root = folder.resolve()
    if not parts or not path.resolve().is_relative_to(root) or path.resolve() == root:
        raise BadInputError(f"refusing to write {str(Path(*parts)) if parts else ''!r}: the name leaves the output "
                            f"folder '{folder}'; use a plain file name (no '/', '\\' or '..')")
    return path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = True):
    """Yield a temporary folder beside ``target``; it replaces ``target`` only if the block succeeds.

    With ``replace=False`` a ``target`` that exists when the block ends (another process made it meanwhile)
    is kept and the new folder dropped: the first writer wins, and no reader sees its folder moved away.
    """
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
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
            old = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
