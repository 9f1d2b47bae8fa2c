"""Giving up root: started as root (to bind ports 25, 110, 465, 587, 995), the supervisor drops
to [host] user once its sockets are bound, before any job starts, so every job runs as that
user too. The data directory is made that user's first. Started as anyone else, nothing
changes.
"""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path


class PrivilegeError(Exception):
    """The drop cannot be done safely; the message says what to change."""


def drop_to(user: str, data_dir: Path, *, check_interpreter: bool = True) -> str | None:
    """Become `user` when running as root; what was done, for the log (None: nothing)."""
    if os.geteuid() != 0 or user == "root":
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"host.user {user!r} does not exist: create it (`make run` does: "
                             f"useradd --system {user}) or name another user") from None
    # Jobs are started fresh from this interpreter: the user must be able to run it and read
    # the package (Python under a private home, e.g. pyenv in /root, it cannot).
    import mailpool

    needed = [(Path(sys.executable), os.X_OK), (Path(mailpool.__file__).parent,
                                                 os.R_OK | os.X_OK)]
    for path, need in needed if check_interpreter else []:
        blocked = unreachable(path.resolve(), entry.pw_uid, entry.pw_gid, need)
        if blocked is not None:
            raise PrivilegeError(f"host.user {user!r} cannot use {path} ({blocked}): install "
                                 "mailpool where that user can reach it, or run as another "
                                 "user (`serve --user`, [host] user)")
    _chown_tree(data_dir, entry.pw_uid, entry.pw_gid)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    for path in (data_dir, *data_dir.parents):
        if not os.access(path, os.X_OK):
            raise PrivilegeError(f"data directory {data_dir}: user {user} cannot enter {path} "
                                 "(make it searchable, or put the data elsewhere)")
    if not os.access(data_dir, os.R_OK | os.W_OK | os.X_OK):
        raise PrivilegeError(f"data directory {data_dir}: user {user} cannot write there")
    return f"running as {user} (uid {entry.pw_uid})"


def unreachable(path: Path, uid: int, gid: int, need: int) -> str | None:
    """Why uid:gid cannot use `path` with `need` (os.X_OK / os.R_OK bits), or None: every
    directory above it must be searchable and the path itself allow `need`, by the mode
    bits of owner, group or others as they apply to that user."""

    def allowed(p: Path, bits: int) -> bool:
        st = os.stat(p)
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        mode = (st.st_mode >> shift) & 0o7
        want = (1 if bits & os.X_OK else 0) | (4 if bits & os.R_OK else 0)
        return mode & want == want

    for parent in reversed(path.parents):
        if not allowed(parent, os.X_OK):
            return f"{parent} is not searchable by it"
    if not allowed(path, need):
        return f"{path} is not {'executable' if need == os.X_OK else 'readable'} by it"
    return None


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give the data directory and everything below it to uid:gid (only what differs)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (".", *dirnames, *filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_uid != uid or st.st_gid != gid:
                os.lchown(path, uid, gid)
