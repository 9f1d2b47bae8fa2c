"""The one interface every directory backend implements (the file, PostgreSQL).

Everything here is synchronous and may block (a file read, a database round trip): the CLI
calls it directly, jobs through mailpool.directory.cached (worker threads, a TTL cache).
"""

from __future__ import annotations

import abc
from typing import Protocol

from mailpool.directory.model import User, lookup_key
from mailpool.directory.passwords import check_login


class AddressLookup(Protocol):
    """All the framework pass needs: who owns an address (synchronous)."""

    def lookup(self, address: str) -> User | None: ...


class UserDirectory(abc.ABC):
    """Users, their addresses and password hashes.

    Reads raise DirectoryError when the directory cannot be read (DirectoryUnavailable when
    that is temporary); edits raise DirectoryError naming the value that is refused.
    """

    #: True when every call is a network round trip (jobs cache it and use threads); False
    #: for the local file, which is read in place and notices changes by itself.
    remote: bool = False

    @abc.abstractmethod
    def users(self) -> list[User]:
        """All users, in the order they were added."""

    @abc.abstractmethod
    def get(self, name: str) -> User | None:
        """The user called `name`, or None."""

    @abc.abstractmethod
    def lookup(self, address: str) -> User | None:
        """The user owning `address` (case-insensitive, exact match), or None."""

    def lookup_many(self, addresses: list[str]) -> dict[str, User | None]:
        """Each address's owner at once, keyed by the address as given (a backend with
        round trips answers in one)."""
        return {a: self.lookup(a) for a in addresses}

    def authenticate(self, name: str, password: str) -> bool:
        return check_login(self.get(name), password)

    @abc.abstractmethod
    def add_user(self, name: str, addresses: list[str], password: str | None, *,
                 password_hash: str | None = None) -> User:
        """Add a user; DirectoryError if the name exists or an address is taken.

        `password` is hashed with scrypt; `password_hash` instead keeps a Dovecot-style
        "{SCHEME}hash" as given (PasswordHashError if it is unusable); neither: no POP login.
        """

    @abc.abstractmethod
    def remove_user(self, name: str) -> User:
        """Remove a user and return it; DirectoryError if unknown."""

    @abc.abstractmethod
    def set_password(self, name: str, password: str | None, *,
                     password_hash: str | None = None) -> None:
        """Set (or with None, clear: no POP login) a user's password, or with
        `password_hash` store a Dovecot-style "{SCHEME}hash" as given."""

    @abc.abstractmethod
    def set_addresses(self, name: str, addresses: list[str]) -> User:
        """Replace a user's addresses; DirectoryError if one belongs to someone else."""

    def describe(self) -> str:
        """Where the directory is, for messages (never a password)."""
        return type(self).__name__

    def close(self) -> None:  # noqa: B027 - a file has nothing to release
        """Release connections."""


def lookup_keys(addresses: list[str]) -> dict[str, str]:
    """address as given -> normalised key, for the addresses some user could own."""
    out: dict[str, str] = {}
    for a in addresses:
        key = lookup_key(a)
        if key is not None:
            out[a] = key
    return out
