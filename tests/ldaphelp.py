"""A private OpenLDAP slapd for the LDAP address book tests.

Everything lives in one temporary directory: a generated slapd.conf (the mdb backend, the
core, cosine and inetorgperson schemas, suffix dc=example,dc=test, a rootdn with a plain
rootpw), the database, the pid file and slapd's log. slapd runs in the foreground (`-d 0`,
so it never detaches and the Popen handle is the daemon itself) on a free 127.0.0.1 port,
optionally with ldaps on a second port from a trustme certificate; `stop()` kills it and
waits. Nothing touches the system slapd (Debian's package is installed unconfigured).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

SUFFIX = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "secret"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")
SUFFIX_LDIF = f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n" \
              "dc: example\no: Example\n\n"


def _tool(name: str) -> str:
    for found in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if found and os.access(found, os.X_OK):
            return found
    pytest.skip(f"{name} not installed (Debian slapd/ldap-utils; tests/install_tools.sh "
                "installs them)")


def require_slapd() -> None:
    """Skip the test unless slapd, its tools and the schemas are here."""
    for name in ("slapd", "slapadd", "slapcat", "ldapsearch", "ldapadd", "ldapmodify"):
        _tool(name)
    for schema in ("core", "cosine", "inetorgperson"):
        if not (SCHEMA_DIR / f"{schema}.schema").is_file():
            pytest.skip(f"{SCHEMA_DIR}/{schema}.schema missing (Debian slapd)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slapd:
    def __init__(self, root: Path, *, certs: tuple[Path, Path] | None = None) -> None:
        require_slapd()
        self.root = root
        self.db = root / "db"
        self.db.mkdir(parents=True)
        self.conf = root / "slapd.conf"
        self.log = root / "slapd.log"
        self.certs = certs
        self.port = self.tls_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf.write_text(self._config())

    def _config(self) -> str:
        lines = [f"include {SCHEMA_DIR}/{s}.schema" for s in ("core", "cosine", "inetorgperson")]
        lines += [f"pidfile {self.root}/slapd.pid", f"argsfile {self.root}/slapd.args"]
        if (MODULE_DIR / "back_mdb.so").exists():  # Debian builds backends as modules
            lines += [f"modulepath {MODULE_DIR}", "moduleload back_mdb"]
        if self.certs:
            lines += [f"TLSCertificateFile {self.certs[0]}",
                      f"TLSCertificateKeyFile {self.certs[1]}"]
        lines += ["database mdb", "maxsize 67108864", f'suffix "{SUFFIX}"',
                  f'rootdn "{ROOT_DN}"', f"rootpw {ROOT_PW}", f"directory {self.db}",
                  "index objectClass eq", "index uid eq"]
        return "\n".join(lines) + "\n"

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    # -- offline tools: they work on the database while slapd is stopped --------------------

    def slapadd(self, ldif: str) -> subprocess.CompletedProcess[str]:
        path = self.root / "load.ldif"
        path.write_text(ldif)
        return subprocess.run([_tool("slapadd"), "-f", str(self.conf), "-l", str(path)],
                              capture_output=True, text=True, timeout=30)

    def slapcat(self) -> str:
        return subprocess.run([_tool("slapcat"), "-f", str(self.conf), "-o", "ldif-wrap=no"],
                              capture_output=True, text=True, timeout=30, check=True).stdout

    # -- the daemon ----------------------------------------------------------------------

    def start(self) -> Slapd:
        self.port = free_port()
        urls = self.url + "/"
        if self.certs:
            self.tls_port = free_port()
            urls += " " + self.ldaps_url + "/"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([_tool("slapd"), "-f", str(self.conf), "-h", urls,
                                          "-d", "0"], stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                for port in filter(None, (self.port, self.tls_port)):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("slapd did not listen within 15 s")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc = None

    # -- ldap-utils against the running daemon -------------------------------------------

    def ldapadd(self, ldif: str, *, cont: bool = False) -> subprocess.CompletedProcess[str]:
        args = [_tool("ldapadd"), "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PW]
        return subprocess.run(args + (["-c"] if cont else []), input=ldif,
                              capture_output=True, text=True, timeout=30)

    def modify(self, dn: str, changes: str) -> None:
        """ldapmodify one entry with `changes` (e.g. "replace: cn\ncn: X\n")."""
        ldif = f"dn: {dn}\nchangetype: modify\n{changes}"
        subprocess.run([_tool("ldapmodify"), "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PW],
                       input=ldif, capture_output=True, text=True, timeout=30, check=True)

    def search(self, base: str = SUFFIX, filt: str = "(objectClass=*)",
               *attrs: str) -> dict[str, dict[str, list[str]]]:
        """ldapsearch (anonymous, the default ACL lets everyone read), parsed: {dn: attrs}."""
        out = subprocess.run([_tool("ldapsearch"), "-x", "-LLL", "-H", self.url, "-b", base,
                              "-o", "ldif-wrap=no", filt, *attrs],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 32:  # noSuchObject: the base is not there
            return {}
        assert out.returncode == 0, out.stderr
        return parse_ldif(out.stdout)


def parse_ldif(text: str) -> dict[str, dict[str, list[str]]]:
    """A small RFC 2849 reader (content records only) for checking what tools print."""
    records: dict[str, dict[str, list[str]]] = {}
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines: list[str] = []
        for line in block.split("\n"):
            if line.startswith(" ") and lines:
                lines[-1] += line[1:]  # unfold
            elif line and not line.startswith("#"):
                lines.append(line)
        lines = [x for x in lines if not x.startswith("version:")]
        if not lines:
            continue
        pairs = []
        for line in lines:
            attr, _, rest = line.partition(":")
            if rest.startswith(":"):
                value = base64.b64decode(rest[1:].strip()).decode("utf-8")
            else:
                value = rest.lstrip(" ")  # FILL, then SAFE-STRING
            pairs.append((attr, value))
        (key, dn), attrs = pairs[0], {}
        assert key.lower() == "dn", block
        for attr, value in pairs[1:]:
            attrs.setdefault(attr, []).append(value)
        records[dn] = attrs
    return records
