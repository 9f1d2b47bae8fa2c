"""The control channel between the supervisor and one job.

An AF_UNIX SOCK_SEQPACKET socketpair: every datagram is one msgpack message (a tagged
msgspec Struct), so no framing is needed. Connected sockets travel beside an `Assign`
message as SCM_RIGHTS ancillary data.
"""

from __future__ import annotations

import array
import socket
from typing import Any

import msgspec
import trio

from mailpool.activity import Tally

MAX_MESSAGE = 256 * 1024
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)


class Msg(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    pass


class OutboundItem(msgspec.Struct, array_like=True):
    """A message waiting for the SMTP client: where it is and when, and its next hops (the
    dispatcher's per-destination limits and pauses work on these)."""

    queue_id: str
    queue: str               # "outbound", "retry1" or "retry2"
    destinations: list[str]
    next_attempt: float = 0.0  # Unix seconds; 0 = now


# supervisor -> job
class Assign(Msg):
    """A connected socket follows as ancillary data."""

    conn_id: int
    peer_ip: str
    peer_port: int
    listener: str
    # Recent failed logins from this peer address (any job): POP slows them down.
    auth_failures: int = 0


class Work(Msg):
    """A queue pool job: process these messages from the incoming queue, as one batch (one
    group commit). Each item is (queue id, again): `again` says an earlier pass may have run
    (start-up recovery, a dead job, a retry)."""

    items: list[tuple[str, bool]]


class Deliver(Msg):
    """An smtp-client job: attempt delivery of this message now. Recipients whose next hop is
    in `skip` (paused as dead) are left pending without being tried."""

    item: OutboundItem
    skip: list[str] = []


class SendEtrn(Msg):
    """An smtp-client job: connect to the router and ask it (ETRN) to release mail for these
    domains (the source's scheduler for dial-up style peers)."""

    domains: list[str]


class Drain(Msg):
    """Finish open sessions (bounded by the pool's drain_timeout), take no more, exit."""

    reason: str


class Synced(Msg):
    """Answer to SyncRequest: everything written before the request is durable."""

    token: int
    ok: bool = True


# job -> supervisor
class Ready(Msg):
    pid: int


class Heartbeat(Msg):
    pass


class ActivityReport(Msg):
    """A job's counts since its last report (mailpool.activity), at most once a second."""

    tally: Tally


class SessionEnded(Msg):
    conn_id: int
    free_slots: int = 0


class WorkDone(Msg):
    """The batch is done: (queue id, ok) per item, its last journal entries, and the messages
    it put on queues (forwarded to the outbound queue, notices to the incoming queue)."""

    results: list[tuple[str, bool]]
    entries: list[tuple[str, int, bytes]] = []
    handed: list[OutboundItem] = []


class Delivered(Msg):
    """An smtp-client job finished an attempt: how each next hop answered ("ok", "failed",
    "unreachable", "skipped"), and where the message is now (None: done, off the queues)."""

    queue_id: str
    outcomes: list[tuple[str, str]]
    after: OutboundItem | None = None
    entries: list[tuple[str, int, bytes]] = []
    failed: bool = False  # the attempt broke off (a bug, an I/O error): reload from the spool


class Flush(Msg):
    """ETRN from a client: deliver queued mail for `domain` (and its subdomains) now."""

    token: int
    domain: str
    subdomains: bool = False


class Flushed(Msg):
    token: int
    count: int


class Journal(Msg):
    """Journal entries, in order: (code, time_ns, msgpack payload). One message for a group of
    entries (e.g. the 94 91 92 9T 99 97 of one received message) saves channel round trips."""

    entries: list[tuple[str, int, bytes]]


class SyncRequest(Msg):
    """Group commit: make everything written so far durable, then (and only then) write
    these journal entries and hand these (queue, queue id) pairs to the dispatcher."""

    token: int
    entries: list[tuple[str, int, bytes]] = []
    queued: list[tuple[str, str]] = []


class AuthFailed(Msg):
    """A login from this address failed; the supervisor counts them across all jobs and
    answers AuthCount with the address's recent total."""

    token: int
    ip: str


class AuthCount(Msg):
    token: int
    failures: int


ToJob = Assign | Work | Deliver | SendEtrn | Drain | Synced | AuthCount | Flushed
ToSupervisor = (Ready | Heartbeat | ActivityReport | SessionEnded | WorkDone | Delivered
                | Journal | SyncRequest | AuthFailed | Flush)

_encoder = msgspec.msgpack.Encoder()
_to_job = msgspec.msgpack.Decoder(ToJob)
_to_supervisor = msgspec.msgpack.Decoder(ToSupervisor)


class ChannelClosed(Exception):
    """The other side closed the channel (or died)."""


class Channel:
    """One end of the control channel, on a Trio socket."""

    def __init__(self, sock: trio.socket.SocketType, inbound: type) -> None:
        self.sock = sock
        self._decoder = _to_job if inbound is ToJob else _to_supervisor
        self._send_lock = trio.Lock()

    async def send(self, msg: Msg, fd: int | None = None) -> None:
        data = _encoder.encode(msg)
        anc = []
        if fd is not None:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        async with self._send_lock:
            try:
                await self.sock.sendmsg([data], anc)
            except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                raise ChannelClosed(str(exc)) from None

    async def receive(self) -> tuple[Any, int | None]:
        """Next message and the fd that came with it (if any). Raises ChannelClosed at EOF."""
        try:
            data, ancdata, flags, _ = await self.sock.recvmsg(
                MAX_MESSAGE, _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
        except (ConnectionResetError, OSError) as exc:
            raise ChannelClosed(str(exc)) from None
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if flags & socket.MSG_CTRUNC:
            # More descriptors than we asked for: close them all rather than leak.
            for extra in fds:
                socket.close(extra)
            raise ChannelClosed("ancillary data truncated (MSG_CTRUNC)")
        if not data:
            for extra in fds:
                socket.close(extra)
            raise ChannelClosed("end of channel")
        msg = self._decoder.decode(data)
        return msg, (fds[0] if fds else None)

    def close(self) -> None:
        self.sock.close()


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A SEQPACKET pair; the child's end is inheritable, the parent's is not."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child.set_inheritable(True)
    return parent, child
