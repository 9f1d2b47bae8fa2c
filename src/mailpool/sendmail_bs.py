"""`sendmail -bs`: the SMTP server core spoken on stdin/stdout for a local program."""

from __future__ import annotations

import os
import re
import select
from typing import BinaryIO

from mailpool.config import LoadedConfig
from mailpool.protocol import smtp_server as core
from mailpool.submit import (
    SubmitError,
    is_unknown_local,
    normalize_line_ends,
    qualify,
    submit,
)

EX_OK = 0  # sysexits.h: the session ran (replies said what went wrong)

_END_OF_DATA = re.compile(rb"(?:\A|\n)\.\r\n")


class SmtpOnStdio:
    """Postfix's `sendmail -bs`: the SMTP server core on stdin/stdout, for a local user (no
    relay check, no TLS, no AUTH). Input is handed to the core a line at a time (a whole
    DATA section at once), so a script may write the whole session before reading a reply:
    the core's pipelining checks see only what a waiting client would have sent. Bare LF
    line ends are read as CRLF."""

    def __init__(self, loaded: LoadedConfig, stdin: BinaryIO, stdout: BinaryIO) -> None:
        import atexit

        from mailpool.directory import open_directory

        cfg = loaded.config
        self.loaded = loaded
        self.conn = core.ServerConnection(core.ServerLimits(
            hostname=cfg.host.name, max_message_size=cfg.smtp.max_message_size,
            max_recipients=cfg.smtp.max_recipients, max_command_line=cfg.smtp.max_command_line,
            max_text_line=cfg.smtp.max_text_line, hard_error_limit=cfg.smtp.hard_error_limit,
            dsn=False, etrn=False))
        self.stdin = stdin
        self.stdout = stdout
        self.directory = open_directory(loaded)
        atexit.register(self.directory.close)
        self.local = {d.lower().rstrip(".") for d in cfg.host.local_domains}
        self.pending = bytearray()
        self.eof = False

    def run(self) -> int:
        conn = self.conn
        conn.greeting()
        try:
            while True:
                event = conn.next_event()
                if event is core.NEED_DATA:
                    self.flush()
                    if conn.closed:
                        return EX_OK
                    if not self.feed():
                        conn.timeout()
                        self.flush()
                        return EX_OK
                elif isinstance(event, core.MailFrom):
                    conn.reply(250, "Ok", "2.1.0")
                elif isinstance(event, core.RcptTo):
                    self.rcpt(event.address)
                elif isinstance(event, core.MessageReceived):
                    self.message(event)
                elif isinstance(event, core.Verify):
                    conn.reply(252, "Cannot VRFY user, but will accept message and attempt "
                                    "delivery", "2.0.0")
                elif isinstance(event, core.Etrn | core.Authenticate):
                    conn.reply(454 if isinstance(event, core.Authenticate) else 458,
                               "Not available here")  # neither is offered: not reached
                elif isinstance(event, core.StartTls):
                    conn.tls_failed()
                elif isinstance(event, core.ConnectionClosed):
                    self.flush()
                    return EX_OK
        except BrokenPipeError:
            return EX_OK  # the client went away

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.stdout.write(out)
            self.stdout.flush()

    def feed(self) -> bool:
        """Give the core its next piece of input (b"" at end of file); False on a timeout."""
        cfg = self.loaded.config.smtp
        in_data = self.conn.state == "data"
        while True:
            chunk = self._take(in_data)
            if chunk is not None:
                self.conn.receive_data(chunk)
                return True
            if self.eof:
                rest = normalize_line_ends(bytes(self.pending))
                self.pending.clear()
                self.conn.receive_data(rest)
                if not rest:
                    return True
                continue  # b"" follows the unfinished last line
            fd = self.stdin.fileno()
            if not _readable(fd, cfg.data_timeout if in_data else cfg.command_timeout):
                return False
            data = os.read(fd, 65536)
            if data:
                self.pending += data
            else:
                self.eof = True

    def _take(self, in_data: bool) -> bytes | None:
        """The next command line, or the complete lines of DATA up to its end; None when no
        complete line is waiting (the eof path then hands over the rest)."""
        end = self.pending.rfind(b"\n") if in_data else self.pending.find(b"\n")
        if end < 0:
            return None
        chunk = normalize_line_ends(bytes(self.pending[: end + 1]))
        del self.pending[: end + 1]
        if in_data:
            found = _END_OF_DATA.search(chunk)
            if found is not None:
                self.pending[:0] = chunk[found.end():]
                chunk = chunk[: found.end()]
        return chunk

    def rcpt(self, address: str) -> None:
        from mailpool.directory import DirectoryError

        address = qualify(address, self.loaded.config.host.local_domains[0])
        try:
            unknown = is_unknown_local(address, self.local, self.directory)
        except (DirectoryError, OSError):
            self.conn.reply(451, f"<{address}>: Temporary lookup failure", "4.3.0")
            return
        if unknown:
            self.conn.reply(550, f"<{address}>: Recipient address rejected: User unknown in "
                                 "local recipient table", "5.1.1")
        else:
            self.conn.reply(250, "Ok", "2.1.5")

    def message(self, event: core.MessageReceived) -> None:
        domain = self.loaded.config.host.local_domains[0]
        try:
            queue_id = submit(self.loaded, originator=event.originator,
                              recipients=[qualify(r, domain) for r in event.recipients],
                              content=event.content, source="sendmail",
                              protocol="ESMTP" if self.conn.esmtp else "SMTP",
                              helo=self.conn.helo or "")
        except SubmitError as exc:
            if exc.reason == "space":
                self.conn.reply(452, "Insufficient system storage", "4.3.1")
            elif exc.reason == "size":
                self.conn.reply(552, "Message size exceeds fixed limit", "5.3.4")
            elif exc.reason in ("address", "length"):
                self.conn.reply(554, exc.text, "5.5.4")
            else:
                self.conn.reply(451, f"Error: queue file write error ({exc.text})", "4.3.0")
            return
        self.conn.reply(250, f"Ok: queued as {queue_id}", "2.0.0")


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


# --- entry point ----------------------------------------------------------------------------


