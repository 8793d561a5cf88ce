"""Directories only this user controls: the registry's and the shared-memory segments'.

Both hold what another local user must neither read nor replace (run ids, request data), and
both sit in places every user can write (``/tmp``, ``/dev/shm``), where someone could create the
directory first, or a symbolic link in its place. So a directory is trusted only if it is a
real directory (opened with ``O_NOFOLLOW``), owned by this user, with no group or other bits.
A directory made here is 0700; the mode of an existing one is never changed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path


class Unusable(Exception):
    """The directory cannot be trusted: why, and what the user can do about it."""

    def __init__(self, reason: str, remedy: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.remedy = remedy


def open_private_dir(directory: Path, elsewhere: Callable[[str], str]) -> int:
    """An fd of ``directory`` (created 0700 if missing) after checking that only we control it.

    ``elsewhere(fix)`` words the remedy: the fix, and where else the user may point us.
    Raises :class:`Unusable`.
    """
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise Unusable(
            f"cannot create {directory}: {exc.strerror}",
            elsewhere(f"make sure {directory.parent} exists and is writable"),
        ) from None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # the kernel reports either for a link
            kind = "a symbolic link" if directory.is_symlink() else "not a directory"
            raise Unusable(f"{directory} is {kind}", elsewhere(f"remove {directory}")) from None
        raise Unusable(
            f"{directory} cannot be opened ({exc.strerror})", elsewhere(f"check {directory}")
        ) from None
    info = os.fstat(fd)
    if info.st_uid != os.getuid():
        os.close(fd)
        raise Unusable(
            f"{directory} is owned by uid {info.st_uid}, not by you (uid {os.getuid()})",
            elsewhere(f"if you did not create it, someone else did: have {directory} removed"),
        )
    if info.st_mode & 0o077:
        os.close(fd)
        raise Unusable(
            f"{directory} has mode {stat.S_IMODE(info.st_mode):04o}, not 0700: others can see"
            " or replace what is in it",
            elsewhere(f"check its content and run `chmod 700 {directory}`"),
        )
    return fd
