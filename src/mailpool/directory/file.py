"""The directory as one JSON file under the data directory (the default backend).

Writers take an exclusive flock on a sibling `<name>.lock` file, re-read the file, change it
and replace it atomically (temp, fsync, rename, fsync dir), so two concurrent edits cannot
lose each other's changes. Readers never lock: a rename is atomic, and each read does one
stat to notice that another process replaced the file, so running jobs see a change at once
(no cache is needed in front of it).
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec

from mailpool.directory.backend import UserDirectory
from mailpool.directory.model import (
    DirectoryError,
    User,
    lookup_key,
    normalise_addresses,
    validate_address,
    validate_user_name,
)
from mailpool.directory.passwords import password_hash_for
from mailpool.fsutil import write_file_durably

T = TypeVar("T")


class _DirectoryFile(msgspec.Struct):
    version: int = 1
    users: list[User] = []


_StatKey = tuple[int, int, int, int, int]


def _stat_key(st: os.stat_result) -> _StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Snapshot:
    def __init__(self, key: _StatKey | None, users: list[User], source: Path) -> None:
        self.key = key
        self.users = users
        self.by_name: dict[str, User] = {}
        self.by_address: dict[str, User] = {}
        for u in users:
            try:
                validate_user_name(u.name)
                addresses = [validate_address(a) for a in u.addresses]
            except DirectoryError as e:
                raise DirectoryError(f"{source}: {e}") from None
            if u.name in self.by_name:
                raise DirectoryError(f"{source}: user {u.name!r} appears twice")
            self.by_name[u.name] = u
            for a in addresses:
                other = self.by_address.get(a)
                if other is not None and other.name != u.name:
                    raise DirectoryError(
                        f"{source}: address {a!r} belongs to both {other.name!r} and {u.name!r}"
                    )
                self.by_address[a] = u


class FileDirectory(UserDirectory):
    """The directory as one JSON file (the default backend, one host)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock = threading.Lock()
        self._snap = _Snapshot(None, [], self.path)

    # -- reading --------------------------------------------------------------------------

    def _read(self) -> _Snapshot:
        try:
            with open(self.path, "rb") as f:
                # fstat of the open file, not the path: the key must describe what we read.
                key = _stat_key(os.fstat(f.fileno()))
                data = f.read()
        except FileNotFoundError:
            return _Snapshot(None, [], self.path)
        try:
            doc = msgspec.json.decode(data, type=_DirectoryFile)
        except msgspec.DecodeError as e:
            raise DirectoryError(f"{self.path}: {e}") from None
        if doc.version != 1:
            raise DirectoryError(f"{self.path}: unsupported version {doc.version}")
        return _Snapshot(key, doc.users, self.path)

    def _current(self) -> _Snapshot:
        try:
            key: _StatKey | None = _stat_key(os.stat(self.path))
        except FileNotFoundError:
            key = None
        with self._lock:
            if key != self._snap.key:
                self._snap = self._read()
            return self._snap

    def users(self) -> list[User]:
        # reflects edits by other processes (the stat in _current)
        return list(self._current().users)

    def get(self, name: str) -> User | None:
        return self._current().by_name.get(name)

    def lookup(self, address: str) -> User | None:
        key = lookup_key(address)
        return None if key is None else self._current().by_address.get(key)

    # -- editing --------------------------------------------------------------------------

    def _edit(self, change: Callable[[_Snapshot], tuple[list[User], T]]) -> T:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            users, result = change(self._read())
            data = msgspec.json.format(msgspec.json.encode(_DirectoryFile(users=users)), indent=2)
            write_file_durably(self.path.parent, self.path.name, data + b"\n", mode=0o600)
        finally:
            os.close(fd)  # releases the flock
        return result

    @staticmethod
    def _check_free(snap: _Snapshot, name: str, addresses: list[str]) -> None:
        for a in addresses:
            owner = snap.by_address.get(a)
            if owner is not None and owner.name != name:
                raise DirectoryError(f"address {a!r}: already belongs to user {owner.name!r}")

    def add_user(self, name: str, addresses: list[str], password: str | None, *,
                 password_hash: str | None = None) -> User:
        validate_user_name(name)
        addrs = normalise_addresses(addresses)
        # scrypt (or the foreign hash's trial check) outside the lock
        user = User(name, addrs, password_hash_for(name, password, password_hash))

        def change(snap: _Snapshot) -> tuple[list[User], User]:
            if name in snap.by_name:
                raise DirectoryError(f"user {name!r}: already exists")
            self._check_free(snap, name, addrs)
            return [*snap.users, user], user

        return self._edit(change)

    def remove_user(self, name: str) -> User:
        def change(snap: _Snapshot) -> tuple[list[User], User]:
            user = self._existing(snap, name)
            return [u for u in snap.users if u.name != name], user

        return self._edit(change)

    @staticmethod
    def _existing(snap: _Snapshot, name: str) -> User:
        user = snap.by_name.get(name)
        if user is None:
            raise DirectoryError(f"user {name!r}: no such user")
        return user

    def set_password(self, name: str, password: str | None, *,
                     password_hash: str | None = None) -> None:
        new_hash = password_hash_for(name, password, password_hash)

        def change(snap: _Snapshot) -> tuple[list[User], None]:
            new = msgspec.structs.replace(self._existing(snap, name), password_hash=new_hash)
            return [new if u.name == name else u for u in snap.users], None

        self._edit(change)

    def set_addresses(self, name: str, addresses: list[str]) -> User:
        addrs = normalise_addresses(addresses)

        def change(snap: _Snapshot) -> tuple[list[User], User]:
            new = msgspec.structs.replace(self._existing(snap, name), addresses=addrs)
            self._check_free(snap, name, addrs)
            return [new if u.name == name else u for u in snap.users], new

        return self._edit(change)

    def describe(self) -> str:
        return str(self.path)


# The name this backend always had: `Directory(path)` is the file directory.
Directory = FileDirectory
