"""A small authoritative DNS server for the test suite, on 127.0.0.1 over UDP and TCP.

It runs in a background thread (plain sockets and a selector), so synchronous tests and
Trio tests alike can point a resolver at it:

    with DnsServer() as dns_server:
        dns_server.add("example.test", "MX", "10 mx1.example.test.")
        dns_server.add("mx1.example.test", "A", "127.0.0.1")
        ... DnsSettings(nameservers=("127.0.0.1",), port=dns_server.port) ...

Answers:
- a name with records of the asked type: those records (a CNAME is followed within the data);
- a name with records of other types only: NOERROR, no answer, an SOA in authority (NODATA);
- a name never added, or marked with nxdomain(): NXDOMAIN with an SOA in authority;
- servfail(name): SERVFAIL; silence(name): no response at all, over UDP or TCP (both
  take an optional type to affect only queries of that type).
Records go out in the order they were added (no rotation), so tests can assert orders.
servfail() and silence() hold until clear(); nxdomain() drops the name's records and add()
lifts it again. UDP answers larger than 512 bytes (or the query's EDNS size) come back
empty with TC set, so resolvers retry over TCP.

`queries` lists every (name, type) asked, over either transport, as ("mx1.example.test",
"A"); `tcp_queries` lists those that came over TCP. `errors` keeps any exception the
server itself raised while answering (that query got no answer), for tests to check.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import threading
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

HOST = "127.0.0.1"
UDP_LIMIT = 512  # RFC 1035 4.2.1, without EDNS
TCP_LIMIT = 65535
# A query is a few dozen bytes; anything much larger over TCP is garbage, and a client that
# does not read its answers gets cut off rather than grow our buffers.
MAX_TCP_QUERY = 4096
MAX_TCP_PENDING = 1 << 20
MAX_TCP_CONNECTIONS = 64
MAX_CHASE = 8  # CNAME links followed in one answer
SOA_TTL = 60

# servfail()/silence() marks: a name, for every type (None) or for one.
_Mark = tuple[dns.name.Name, dns.rdatatype.RdataType | None]


class _Tcp:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()


class DnsServer:
    def __init__(self) -> None:
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self.tcp_queries: list[tuple[str, str]] = []
        self.errors: list[Exception] = []  # our own failures while answering (should stay [])
        self._lock = threading.Lock()
        self._records: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
        self._nxdomain: set[dns.name.Name] = set()
        self._servfail: set[_Mark] = set()
        self._silence: set[_Mark] = set()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._conns: dict[socket.socket, _Tcp] = {}

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> DnsServer:
        if self._thread is not None:
            raise RuntimeError("DnsServer already started")
        self._udp, self._listener = self._bind()
        self.port = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        assert self._wake_w is not None
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("DnsServer thread did not stop")
        self._thread = None
        for sock in (self._udp, self._listener, self._wake_r, self._wake_w, *self._conns):
            if sock is not None:
                sock.close()
        self._conns.clear()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @staticmethod
    def _bind() -> tuple[socket.socket, socket.socket]:
        """A UDP port chosen by the kernel, and TCP on the same number (retried if taken)."""
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((HOST, 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((HOST, udp.getsockname()[1]))
            except OSError as exc:
                udp.close()
                tcp.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            tcp.listen(16)
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise RuntimeError("no port free for both UDP and TCP")

    # -- the data -------------------------------------------------------------------------

    def add(self, name: str, rtype: str, *values: str, ttl: int = 60) -> None:
        """Add records, e.g. add("example.test", "MX", "10 mx1.example.test.").

        Relative names in values are taken as absolute ("mx1.example.test" ==
        "mx1.example.test."); "0 ." is a null MX.
        """
        if not values:
            raise ValueError("add() needs at least one value")
        owner = dns.name.from_text(name)
        rdtype = dns.rdatatype.from_text(rtype)
        rdatas = [
            dns.rdata.from_text(
                dns.rdataclass.IN, rdtype, value, origin=dns.name.root, relativize=False
            )
            for value in values
        ]
        with self._lock:
            self._nxdomain.discard(owner)
            types = self._records.setdefault(owner, {})
            rrset = types.get(rdtype)
            if rrset is None:
                rrset = types[rdtype] = dns.rrset.RRset(owner, dns.rdataclass.IN, rdtype)
            for rdata in rdatas:
                rrset.add(rdata, ttl)

    def nxdomain(self, name: str) -> None:
        owner = dns.name.from_text(name)
        with self._lock:
            self._records.pop(owner, None)
            self._nxdomain.add(owner)

    def servfail(self, name: str, rtype: str | None = None) -> None:
        """Every query for name (or only those of type rtype) -> SERVFAIL."""
        self._mark(self._servfail, name, rtype)

    def silence(self, name: str, rtype: str | None = None) -> None:
        """Every query for name (or only those of type rtype) -> no answer at all."""
        self._mark(self._silence, name, rtype)

    def _mark(self, marks: set[_Mark], name: str, rtype: str | None) -> None:
        owner = dns.name.from_text(name)
        rdtype = None if rtype is None else dns.rdatatype.from_text(rtype)
        with self._lock:
            marks.add((owner, rdtype))

    def clear(self) -> None:
        """Forget every record, mark and recorded query."""
        with self._lock:
            self._records.clear()
            self._nxdomain.clear()
            self._servfail.clear()
            self._silence.clear()
            self.queries.clear()
            self.tcp_queries.clear()

    # -- answering ------------------------------------------------------------------------

    def answer(self, wire: bytes, *, tcp: bool) -> bytes | None:
        """The response to one query message, or None to stay silent."""
        try:
            return self._answer(wire, tcp=tcp)
        except Exception as exc:  # a bug here must not kill the thread: keep it for the test
            self.errors.append(exc)
            return None

    def _answer(self, wire: bytes, *, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # garbage of any kind gets no answer
            return None
        if query.flags & dns.flags.QR:
            return None  # a response, not a query
        response = dns.message.make_response(query)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        asked = (qname.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(qtype))
        with self._lock:
            self.queries.append(asked)
            if tcp:
                self.tcp_queries.append(asked)
            if (qname, None) in self._silence or (qname, qtype) in self._silence:
                return None
            if (qname, None) in self._servfail or (qname, qtype) in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response.to_wire()
            self._fill(response, qname, qtype)
            limit = TCP_LIMIT if tcp else UDP_LIMIT
            if not tcp and query.edns >= 0:
                limit = max(UDP_LIMIT, min(query.payload, TCP_LIMIT))
            try:
                return response.to_wire(max_size=limit, want_shuffle=False)
            except dns.exception.TooBig:
                pass
        # Too big: over UDP say so (TC) with empty sections; over TCP we cannot do better.
        short = dns.message.make_response(query)
        if tcp:
            short.set_rcode(dns.rcode.SERVFAIL)
        else:
            short.flags |= dns.flags.AA | dns.flags.TC
            short.set_rcode(response.rcode())
        return short.to_wire()

    def _fill(self, response: dns.message.Message, qname: dns.name.Name,
              qtype: dns.rdatatype.RdataType) -> None:
        """Answer from the data (caller holds the lock)."""
        response.flags |= dns.flags.AA
        name = qname
        for _ in range(MAX_CHASE):
            types = None if name in self._nxdomain else self._records.get(name)
            if types is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                break
            if qtype in types:
                response.answer.append(types[qtype])
                return
            cname = types.get(dns.rdatatype.CNAME)
            if cname is None or qtype == dns.rdatatype.CNAME:
                break  # NODATA
            response.answer.append(cname)
            name = cname[0].target  # type: ignore[attr-defined]
        response.authority.append(self._soa(name))

    @staticmethod
    def _soa(name: dns.name.Name) -> dns.rrset.RRset:
        # We play the server of the name's top-level domain (the root for the root).
        zone = dns.name.Name(name.labels[-2:])
        mname = dns.name.Name(("ns", *zone.labels))
        rname = dns.name.Name(("hostmaster", *zone.labels))
        return dns.rrset.from_text(
            zone, SOA_TTL, "IN", "SOA",
            f"{mname.to_text()} {rname.to_text()} 1 3600 600 86400 {SOA_TTL}",
        )

    # -- the thread -----------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._udp and self._listener and self._wake_r
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            sel.register(self._udp, selectors.EVENT_READ, "udp")
            sel.register(self._listener, selectors.EVENT_READ, "accept")
            while True:
                for key, events in sel.select():
                    if key.data == "wake":
                        return
                    if key.data == "udp":
                        self._on_udp()
                    elif key.data == "accept":
                        self._on_accept(sel)
                    else:
                        self._on_tcp(sel, key.data, events)

    def _on_udp(self) -> None:
        assert self._udp is not None
        for _ in range(64):  # a burst, then let the other sockets have a turn
            try:
                wire, peer = self._udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. ICMP errors reported on the socket
            reply = self.answer(wire, tcp=False)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._udp.sendto(reply, peer)

    def _on_accept(self, sel: selectors.BaseSelector) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        if len(self._conns) >= MAX_TCP_CONNECTIONS:
            sock.close()
            return
        sock.setblocking(False)
        conn = self._conns[sock] = _Tcp(sock)
        sel.register(sock, selectors.EVENT_READ, conn)

    def _on_tcp(self, sel: selectors.BaseSelector, conn: _Tcp, events: int) -> None:
        try:
            if events & selectors.EVENT_READ:
                data = conn.sock.recv(65536)
                if not data:
                    raise ConnectionResetError
                conn.inbuf += data
                while len(conn.inbuf) >= 2:
                    size = int.from_bytes(conn.inbuf[:2], "big")
                    if size > MAX_TCP_QUERY:
                        raise ConnectionResetError
                    if len(conn.inbuf) < 2 + size:
                        break
                    wire = bytes(conn.inbuf[2 : 2 + size])
                    del conn.inbuf[: 2 + size]
                    reply = self.answer(wire, tcp=True)
                    if reply is not None:
                        conn.outbuf += len(reply).to_bytes(2, "big") + reply
                if len(conn.outbuf) > MAX_TCP_PENDING:
                    raise ConnectionResetError
            if conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            sel.unregister(conn.sock)
            del self._conns[conn.sock]
            conn.sock.close()
            return
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        sel.modify(conn.sock, wanted, conn)
