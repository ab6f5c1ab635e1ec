"""Which filesystem a folder is on, from the kernel's mount table: SQLite must not live on a network one."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

MOUNTS = Path("/proc/mounts")
#: filesystems whose byte-range locks SQLite cannot rely on (sqlite.org/faq.html#q5, "How To Corrupt" §2.1)
NETWORK = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ncpfs", "coda", "ceph", "glusterfs", "lustre",
           "gpfs", "beegfs", "davfs", "sshfs", "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs",
           "fuse.gcsfuse", "fuse.rclone", "fuse.juicefs", "fuse.davfs2", "fuse.goofys", "fuse.blobfuse"}


def _unescape(field: str) -> str:
    """/proc/mounts writes a space in a path as \\040 (and tab, newline, backslash likewise)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_of(folder: str | Path, mounts: Optional[str | Path] = None) -> Optional[str]:
    """The type of the filesystem ``folder`` is on: that of the longest mount point above it (None if unknown).

    ``mounts``: a mount table in /proc/mounts' format (default: this module's ``MOUNTS``, read when called).
    """
    try:
        table = Path(MOUNTS if mounts is None else mounts).read_text()
    except OSError:
        return None  # no mount table (not Linux): nothing to judge by
    target = os.path.realpath(folder)
    best, fstype = -1, None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1]).rstrip("/") or "/"
        inside = target == point or point == "/" or target.startswith(point + "/")
        if inside and len(point) >= best:  # a later line for the same point is mounted over the earlier one
            best, fstype = len(point), fields[2]
    return fstype


def network_filesystem(folder: str | Path, mounts: Optional[str | Path] = None) -> Optional[str]:
    """The network filesystem type ``folder`` is on, or None when it is local (or unknown)."""
    fstype = filesystem_of(folder, mounts)
    return fstype if fstype in NETWORK else None


__all__ = ["MOUNTS", "NETWORK", "filesystem_of", "network_filesystem"]
