"""The durable spool: one file per message, moved between queue directories by rename.

A message exists once its file has been renamed into a queue directory; anything still
in `tmp/` was never accepted (the SMTP session had not answered 250) and is discarded on
start. Layout under the root:

    tmp/                 files being written: <queue_id>.<writer pid>.<random>
    <queue>/<queue_id>   one file per message, for each name in Spool.QUEUES
    state/<queue_id>     outbound delivery state (attempts, next attempt, each recipient's
                         outcome): mailpool.outbound.state

File format (all integers big-endian):

    magic "MPSP" | version u8 | flags u8 | reserved u16 | envelope length u32 |
    envelope crc32 u32 | content length u64 | content crc32 u32 |
    msgpack envelope | content

The lengths and checksums let `load` tell a damaged file (torn write without fsync, disk
error, a stray edit) from a good one instead of delivering garbage.
"""

from __future__ import annotations

import os
import re
import secrets
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import BinaryIO

import msgspec

from mailpool.fsutil import fsync_dir, write_file_durably

MAGIC = b"MPSP"
VERSION = 1
_HEADER = struct.Struct(">4sBBHIIQI")

_QUEUE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_B32 = "0123456789abcdefghijklmnopqrstuv"  # base32hex: keeps numeric order as string order


class SpoolError(Exception):
    """A spool file is damaged or unreadable; the message names the file and the reason."""


class Envelope(msgspec.Struct, frozen=True, omit_defaults=True):
    queue_id: str
    # RFC 5322 Message-ID without the angle brackets; "" when the message had none.
    message_id: str
    originator: str  # reverse-path, "" for the null sender <>
    recipients: list[str]
    received_ns: int  # time.time_ns() when accepted
    peer_ip: str = ""
    helo: str = ""
    size: int = 0
    attempts: int = 0
    # DSN (RFC 3461): RET ("FULL", "HDRS" or ""), ENVID, and per recipient (parallel to
    # `recipients`, empty when none were given) NOTIFY ("SUCCESS,FAILURE", "NEVER", "" =
    # default) and ORCPT ("rfc822;addr" or "").
    ret: str = ""
    envid: str = ""
    notify: list[str] = []
    orcpt: list[str] = []
    # Received for relay (some recipient outside the local domains): journaled 95, not 94.
    relayed: bool = False
    # A notice this host generated ("failure", "delay", "success"): never answered by another.
    notice: str = ""
    # Released from quarantine by the operator: the filters do not look at it again.
    filter_exempt: bool = False
    # How it came in when not by SMTP: "sendmail" (the command) or "api" (send_mail); the
    # framework journals EH E1 E2 ET for those, as the SMTP server journals 94 91 92 9T.
    source: str = ""

    def rcpt_notify(self, index: int) -> str:
        return self.notify[index] if index < len(self.notify) else ""

    def rcpt_orcpt(self, index: int) -> str:
        return self.orcpt[index] if index < len(self.orcpt) else ""


def _b32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(_B32[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class _IdGenerator:
    """Time-ordered ids: 13 chars of time_ns, 5 of pid, 4 random (22 chars, base32hex).

    Within a process the time part strictly increases (even if the clock steps back or
    two ids fall in one nanosecond); the pid separates concurrent processes; the random
    part covers a pid reused after a restart with the clock set back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ns = 0
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # The lock may have been held by another thread at fork time.
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            now = max(time.time_ns(), self._last_ns + 1)
            self._last_ns = now
        return _b32(now, 13) + _b32(os.getpid(), 5) + _b32(secrets.randbits(20), 4)


_ids = _IdGenerator()


def _check_queue_id(queue_id: str) -> None:
    # Queue ids become file names: keep them free of '/', '.', and anything odd.
    if not isinstance(queue_id, str) or not _QUEUE_ID_RE.fullmatch(queue_id):
        raise ValueError(f"invalid queue id {queue_id!r}")


class Spool:
    QUEUES = ("incoming", "outbound", "retry1", "retry2", "busy", "hold", "quarantine")

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.state = self.root / "state"
        created = False
        for d in (self.root, self.tmp, self.state,
                  *(self.root / q for q in self.QUEUES)):
            if not d.is_dir():
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                created = True
        if created:
            fsync_dir(self.root)
            fsync_dir(self.root.parent)

    # -- naming ---------------------------------------------------------------------------

    def new_queue_id(self) -> str:
        return _ids.next()

    def path(self, queue: str, queue_id: str) -> Path:
        if queue not in self.QUEUES:
            raise ValueError(f"unknown queue {queue!r}")
        _check_queue_id(queue_id)
        return self.root / queue / queue_id

    # -- messages -------------------------------------------------------------------------

    def store(self, queue: str, envelope: Envelope, content: bytes, *, sync: bool = True) -> Path:
        """Write a message into `queue`; durable on return when `sync`.

        With sync=False nothing is fsynced: the caller makes the file and its rename
        durable later (fsutil.syncfs on the spool root) before acknowledging it.
        Storing an existing queue id in the same queue replaces it atomically (used to
        rewrite an envelope, e.g. its attempt count).
        """
        final = self.path(queue, envelope.queue_id)
        env = msgspec.msgpack.encode(envelope)
        content = memoryview(content).cast("B")
        header = _HEADER.pack(
            MAGIC, VERSION, 0, 0, len(env), zlib.crc32(env), len(content), zlib.crc32(content)
        )
        return write_file_durably(final.parent, final.name, [header + env, content],
                                  sync=sync, tmp_dir=self.tmp)

    def _read_header(self, path: Path, f: BinaryIO) -> tuple[int, int, int, int, int]:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise SpoolError(f"{path}: truncated header ({len(head)} bytes)")
        magic, version, _flags, _res, env_len, env_crc, body_len, body_crc = _HEADER.unpack(head)
        if magic != MAGIC:
            raise SpoolError(f"{path}: not a spool file (magic {magic!r})")
        if version != VERSION:
            raise SpoolError(f"{path}: unsupported spool file version {version}")
        size = os.fstat(f.fileno()).st_size
        if size != _HEADER.size + env_len + body_len:
            raise SpoolError(
                f"{path}: size {size} does not match header "
                f"(envelope {env_len} + content {body_len} bytes)"
            )
        return env_len, env_crc, body_len, body_crc, size

    def _decode_envelope(self, path: Path, queue_id: str, env: bytes, env_crc: int) -> Envelope:
        if zlib.crc32(env) != env_crc:
            raise SpoolError(f"{path}: envelope checksum mismatch")
        try:
            envelope = msgspec.msgpack.decode(env, type=Envelope)
        except msgspec.DecodeError as e:
            raise SpoolError(f"{path}: bad envelope: {e}") from None
        if envelope.queue_id != queue_id:
            raise SpoolError(f"{path}: envelope names queue id {envelope.queue_id!r}")
        return envelope

    def load(self, queue: str, queue_id: str) -> tuple[Envelope, bytes]:
        """Envelope and content. FileNotFoundError if absent, SpoolError if damaged."""
        path = self.path(queue, queue_id)
        with open(path, "rb") as f:
            env_len, env_crc, body_len, body_crc, _ = self._read_header(path, f)
            env = f.read(env_len)
            content = f.read(body_len)
        if len(env) != env_len or len(content) != body_len:
            raise SpoolError(f"{path}: truncated while reading")
        envelope = self._decode_envelope(path, queue_id, env, env_crc)
        if zlib.crc32(content) != body_crc:
            raise SpoolError(f"{path}: content checksum mismatch")
        return envelope, content

    def load_envelope(self, queue: str, queue_id: str) -> Envelope:
        """The envelope alone (the content is not read, so its checksum is not checked)."""
        path = self.path(queue, queue_id)
        with open(path, "rb") as f:
            env_len, env_crc, _, _, _ = self._read_header(path, f)
            env = f.read(env_len)
        if len(env) != env_len:
            raise SpoolError(f"{path}: truncated while reading")
        return self._decode_envelope(path, queue_id, env, env_crc)

    def list(self, queue: str) -> list[str]:
        """Queue ids in `queue`, oldest first (ids sort by creation time)."""
        if queue not in self.QUEUES:
            raise ValueError(f"unknown queue {queue!r}")
        return sorted(n for n in os.listdir(self.root / queue) if _QUEUE_ID_RE.fullmatch(n))

    def find(self, queue_id: str) -> str | None:
        """The queue holding `queue_id`, or None."""
        _check_queue_id(queue_id)
        for q in self.QUEUES:
            if (self.root / q / queue_id).exists():
                return q
        return None

    def move(self, queue_id: str, src: str, dst: str, *, sync: bool = True) -> None:
        """Atomically move a message between queues.

        Idempotent for crash recovery: if it is already in `dst` and not in `src`, nothing
        happens. FileNotFoundError if it is in neither.
        """
        a, b = self.path(src, queue_id), self.path(dst, queue_id)
        if a == b:
            return
        try:
            os.rename(a, b)
        except FileNotFoundError:
            if not b.exists():
                raise
            # Already moved by an earlier attempt; still make sure the move is durable.
        if sync:
            fsync_dir(b.parent)
            fsync_dir(a.parent)

    def remove(self, queue: str, queue_id: str, *, sync: bool = True) -> None:
        """Delete a message (and, off an outbound queue, its delivery state). Idempotent."""
        path = self.path(queue, queue_id)
        # The message goes first: a crash in between leaves only an orphan state file
        # (harmless, ids are never reused).
        path.unlink(missing_ok=True)
        if sync:
            fsync_dir(path.parent)
        # A forwarded message keeps its queue id on the outbound queue: taking it off the
        # incoming queue must not touch the client's state.
        if queue != "incoming":
            state = self.state / queue_id
            if state.exists():
                state.unlink(missing_ok=True)
                if sync:
                    fsync_dir(self.state)

    # -- recovery -------------------------------------------------------------------------

    def cleanup_tmp(self, *, max_age: float = 3600.0) -> int:
        """Remove files left in tmp/ by writers that died; returns how many.

        Such a file was never renamed into a queue, so the message was never accepted.
        A file whose writer process is still alive is kept unless it is older than
        `max_age` seconds (then the pid has been reused: no write takes that long).
        """
        removed = 0
        now = time.time()
        with os.scandir(self.tmp) as it:
            for entry in it:
                # ".<queue id>.<writer pid>.<random>.tmp" (fsutil.write_file_durably)
                parts = entry.name.rsplit(".", 3)
                pid = int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None
                try:
                    if pid is not None and _alive(pid):
                        if now - entry.stat(follow_symlinks=False).st_mtime < max_age:
                            continue
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    continue  # its writer renamed or removed it meanwhile
        if removed:
            fsync_dir(self.tmp)
        return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
