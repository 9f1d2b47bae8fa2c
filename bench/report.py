"""The driver's report: tables, issue 11's targets with MET or MISSED, a README block, a chart.

Everything here is pure over the rows bench.run recorded (dicts, as in the JSON lines),
except chart(), which writes a PNG. Each table is built once as cells and rendered either
as aligned text (the terminal) or as Markdown (the README block).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

TARGET_LABEL = "20s 1KB k=1"
MANY_LABEL = "20s 1KB k=100"
HEADLINE = "smtp-source"  # the C client: the targets' figures
SECOND = "smtp_load"  # the Trio generator: the second row, and the latencies
PEER = "postfix"  # ratios are taken against it
IDLE_GOAL = 10_000
IDLE_KB = 10.0
GREETING_IDLE = 1000
GREETING_MS = 100.0
CPU_GOAL_US = 2000.0
KIND_ORDER = ("supervisor", "smtp-server", "framework", "smtp-client", "pop-server")


def _f(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]  # an empty row is a blank line in text, skipped in Markdown
    right: set[int]  # right-aligned columns (numbers)

    def text(self) -> list[str]:
        cells = [r for r in self.rows if r]
        widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in
                  enumerate(self.headers)]

        def fmt(row: list[str]) -> str:
            return "  ".join(c.rjust(widths[i]) if i in self.right else c.ljust(widths[i])
                             for i, c in enumerate(row)).rstrip()

        return [fmt(self.headers), fmt(["-" * w for w in widths]),
                *(fmt(r) if r else "" for r in self.rows)]

    def markdown(self) -> list[str]:
        align = ["---:" if i in self.right else "---" for i in range(len(self.headers))]
        return ["| " + " | ".join(self.headers) + " |", "| " + " | ".join(align) + " |",
                *("| " + " | ".join(c.replace("|", "/") for c in r) + " |"
                  for r in self.rows if r)]


# --- finding rows -------------------------------------------------------------------------


def _rate(r: dict[str, Any]) -> float:
    """A run's throughput: delivered/s where a server delivers, else accepted/s."""
    return r.get("delivered_per_sec") or r["result"]["msgs_per_sec"]


def runs(rows: list[dict[str, Any]], server: str, label: str, client: str = SECOND,
         ) -> list[dict[str, Any]]:
    """Every run of that server, workload and client that did not fail."""
    return [r for r in rows if r.get("kind") == "smtp" and "error" not in r["result"]
            and r["server"] == server and r["label"] == label and r["client"] == client]


def smtp_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per server, workload and client (in order of first appearance): its run of
    median throughput (the lower middle of an even count), with "runs": how many there were."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("kind") == "smtp" and "error" not in r["result"]:
            groups.setdefault((r["server"], r["label"], r["client"]), []).append(r)
    return [sorted(g, key=_rate)[(len(g) - 1) // 2] | {"runs": len(g)} for g in groups.values()]


def find(rows: list[dict[str, Any]], server: str, label: str, client: str = SECOND,
         ) -> dict[str, Any] | None:
    for r in smtp_rows(rows):
        if r["server"] == server and r["label"] == label and r["client"] == client:
            return r
    return None


def med(rows: list[dict[str, Any]], server: str, label: str, client: str,
        get: Callable[[dict[str, Any]], float | None]) -> tuple[float | None, list[float]]:
    """The median over that server's runs of what get() finds, and every value found."""
    values = [v for v in map(get, runs(rows, server, label, client)) if v is not None]
    return (median(values) if values else None), values


def first(rows: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("kind") == kind), None)


def _order(values: list[str]) -> list[str]:
    """Unique, in order of first appearance."""
    return list(dict.fromkeys(values))


def _kinds(by_kind: list[dict[str, float]]) -> list[str]:
    """Process kinds in report order: mailpool's roles first, then the rest by name."""
    seen = {k for d in by_kind for k in d}
    return [k for k in KIND_ORDER if k in seen] + sorted(seen - set(KIND_ORDER))


# --- tables -------------------------------------------------------------------------------


def smtp_table(rows: list[dict[str, Any]]) -> Table:
    """Per workload and server: smtp-source (the headline) first, then the generator; a
    repeated run shows its median-throughput run, and a run that failed shows its error
    where nothing else ran."""
    good = smtp_rows(rows)
    failed = [r for r in rows if r.get("kind") == "smtp" and "error" in r["result"]]
    shown = good + [r for r in failed if not any(
        (g["server"], g["label"], g["client"]) == (r["server"], r["label"], r["client"])
        for g in good)]
    body: list[list[str]] = []
    for label in _order([r["label"] for r in rows if r.get("kind") == "smtp"]):
        if body:
            body.append([])
        for server in _order([r["server"] for r in shown if r["label"] == label]):
            for client in (HEADLINE, SECOND):
                for r in (x for x in shown if x["label"] == label and x["server"] == server
                          and x["client"] == client):
                    body.append(smtp_cells(r, find(rows, PEER, label, client)))
    headers = ["workload", "server", "client", "runs", "sent", "accepted/s", "x pf",
               "delivered/s", "x pf", "greet p50", "greet p99", "DATA p50", "DATA p99",
               "CPU us/msg", "client CPU", "errors"]
    return Table(headers, body, right=set(range(3, 15)))


def smtp_cells(r: dict[str, Any], peer: dict[str, Any] | None) -> list[str]:
    res = r["result"]
    if "error" in res:
        return [r["label"], r["server"], r["client"], "0", *["-"] * 11,
                "ERROR: " + res["error"][:70]]
    g, d = res.get("greeting_ms", {}), res.get("data_ms", {})
    acc, dlv = res["msgs_per_sec"], r.get("delivered_per_sec")
    dlv_text = f"{r['delivered']}/{res['sent']}!" if "delivered" in r and dlv is None \
        else _f(dlv)
    peer_acc = peer["result"]["msgs_per_sec"] if peer else None
    peer_dlv = peer.get("delivered_per_sec") if peer else None
    share = r.get("client_cpu_share")
    return [r["label"], r["server"], r["client"], str(r.get("runs", 1)), str(res["sent"]),
            _f(acc), _f(_ratio(acc, peer_acc), "{:.2f}"), dlv_text,
            _f(_ratio(dlv, peer_dlv), "{:.2f}"),
            _f(g.get("p50"), "{:.1f}"), _f(g.get("p99"), "{:.1f}"),
            _f(d.get("p50"), "{:.1f}"), _f(d.get("p99"), "{:.1f}"),
            _f(r.get("cpu_us_per_msg")), _f(share * 100 if share is not None else None,
                                            "{:.0f}%"),
            ", ".join(f"{k}:{v}" for k, v in res.get("errors", {}).items())]


def cpu_table(rows: list[dict[str, Any]], server: str = "mailpool") -> Table | None:
    """mailpool's CPU per message by process kind, per workload and client."""
    mine = [r for r in smtp_rows(rows) if r["server"] == server and r.get("cpu_us_per_msg")]
    if not mine:
        return None
    kinds = [k for k in _kinds([r["cpu_us_per_msg_by_kind"] for r in mine])
             if any(r["cpu_us_per_msg_by_kind"].get(k, 0.0) >= 0.5 for r in mine)]
    body = []
    for r in sorted(mine, key=lambda r: (_order([x["label"] for x in mine]).index(r["label"]),
                                         r["client"] != HEADLINE)):
        new = r.get("started_by_kind") or {}
        by = r["cpu_us_per_msg_by_kind"]
        body.append([r["label"], r["client"], _f(r["cpu_us_per_msg"]),
                     *(_f(by.get(k)) + (f" ({new[k]} new)" if new.get(k) else "")
                       for k in kinds)])
    return Table(["workload", "client", "total", *kinds], body, right=set(range(2, 3 + len(kinds))))


def idle_table(rows: list[dict[str, Any]]) -> Table | None:
    body = []
    for r in (x for x in rows if x.get("kind") == "idle"):
        b, a = r["before"], r["after"]
        new = ", ".join(f"{n} {k}" for k, n in r.get("new_processes", {}).items()) or "none"
        body.append([r["server"], f"{r['held']}/{r['bound']}", f"{r['ramp_seconds']:.1f}",
                     f"{b['rss_kb'] / 1024:.0f} -> {a['rss_kb'] / 1024:.0f}",
                     f"{b['pss_kb'] / 1024:.0f} -> {a['pss_kb'] / 1024:.0f}",
                     _f(r.get("rss_kb_per_session"), "{:.1f}"),
                     _f(r.get("pss_kb_per_session"), "{:.1f}"),
                     _f(r.get("pss_kb_per_session_sessions_only"), "{:.1f}"),
                     f"{b['processes']} -> {a['processes']}", new])
    if not body:
        return None
    return Table(["server", "held", "ramp s", "RSS MiB", "PSS MiB", "KiB/sess RSS",
                  "KiB/sess PSS", "KiB/sess PSS, sessions alone", "processes", "started"],
                 body, right={1, 2, 5, 6, 7})


def greeting_table(rows: list[dict[str, Any]]) -> Table | None:
    g = first(rows, "greeting-delay")
    if g is None:
        return None

    def cells(what: str, p: dict[str, float], errors: dict[str, int]) -> list[str]:
        return [what, str(p.get("n", 0)), _f(p.get("p50"), "{:.1f}"),
                _f(p.get("p99"), "{:.1f}"), _f(p.get("max"), "{:.1f}"),
                ", ".join(f"{k}:{v}" for k, v in errors.items())]

    return Table(["new clients, one at a time", "n", "p50 ms", "p99 ms", "max ms", "errors"],
                 [cells("nothing else open", g["alone_ms"], g["alone_errors"]),
                  cells(f"{g['held']} idle sessions open", g["with_idle_ms"],
                        g["with_idle_errors"])], right={1, 2, 3, 4})


def journal_table(rows: list[dict[str, Any]]) -> Table | None:
    j = first(rows, "journal")
    if j is None:
        return None
    return Table(["journal", "runs", "CPU us/msg (median)", "each run", "delivered/s (median)"],
                 [["on", str(len(j["cpu_on"])), _f(j["median_on"]),
                   " ".join(f"{v:.0f}" for v in j["cpu_on"]), _f(j["rate_on"])],
                  ["off", str(len(j["cpu_off"])), _f(j["median_off"]),
                   " ".join(f"{v:.0f}" for v in j["cpu_off"]), _f(j["rate_off"])]],
                 right={1, 2, 4})


def pop_table(rows: list[dict[str, Any]]) -> Table | None:
    pops = [r for r in rows if r.get("kind") == "pop"]
    body = []
    for r in pops:
        res = r["result"]
        peer = next((x for x in pops if x["server"] == "dovecot"
                     and x["sessions"] == r["sessions"]), None)
        ratio = _ratio(res["retr_per_sec"], peer["result"]["retr_per_sec"] if peer else None)
        body.append([r["server"], str(r["sessions"]), str(res["retrieved"]),
                     _f(res["retr_per_sec"]), _f(ratio, "{:.2f}"), f"{res['mb_per_sec']:.1f}",
                     _f(res["login_ms"].get("p99"), "{:.1f}"),
                     _f(res["retr_ms"].get("p99"), "{:.2f}"),
                     ", ".join(f"{k}:{v}" for k, v in res["errors"].items())])
    if not body:
        return None
    return Table(["server", "sessions", "RETRs", "RETR/s", "x dovecot", "MB/s", "login p99",
                  "RETR p99", "errors"], body, right={1, 2, 3, 4, 5, 6, 7})


def tls_table(summary: dict[str, Any]) -> Table:
    """The STARTTLS section's medians (a "tls-summary" row): one line a server, then the
    ratio mailpool/Postfix."""
    body: list[list[str]] = []
    for name in ("mailpool", "postfix"):
        s = summary.get(name)
        errs = ", ".join(f"{k}:{v}" for k, v in ((s or {}).get("errors") or {}).items())
        if not s or not s.get("runs"):
            body.append([name, "0", "-", "-", "-", "-", "-", "-", "-",
                         (errs or "no run") if s is None else (errs or "nothing accepted")])
            continue
        share = s.get("client_cpu_share")
        body.append([name, str(s["runs"]), _f(s["handshakes_per_sec"]),
                     _f(s["accepted_per_sec"]), _f(s["delivered_per_sec"]),
                     _f(s["handshake_p50_ms"], "{:.1f}"), _f(s["handshake_p99_ms"], "{:.1f}"),
                     _f(s["cpu_us_per_msg"]), _f(share * 100 if share is not None else None),
                     errs])
    ratio = summary.get("ratio") or {}
    body.append(["mailpool/Postfix", "", *(_f(ratio.get(k), "{:.2f}x") for k in (
        "handshakes_per_sec", "accepted_per_sec", "delivered_per_sec")), "", "",
        _f(ratio.get("cpu_us_per_msg"), "{:.2f}x"), "", ""])
    return Table(["server", "runs", "handshakes/s", "accepted/s", "delivered/s",
                  "STARTTLS p50", "STARTTLS p99", "CPU us/msg", "client CPU %", "errors"],
                 body, right=set(range(1, 9)))


def tls_kinds(summary: dict[str, Any]) -> list[str]:
    out = []
    for name in ("mailpool", "postfix"):
        kinds = sorted(((summary.get(name) or {}).get("cpu_us_per_msg_by_kind") or {}).items(),
                       key=lambda kv: -kv[1])
        if kinds:
            out.append(f"{name} CPU us/msg by process kind: "
                       + ", ".join(f"{k} {v:.0f}" for k, v in kinds if v >= 1))
    return out


def outbound_table(rows: list[dict[str, Any]]) -> Table | None:
    s = first(rows, "outbound-summary")
    if s is None:
        return None
    body = []
    for name in ("mailpool", "postfix"):
        m = s.get(name)
        if m is None:
            body.append([name, "0", "-", "-", "-", "no successful run"])
            continue
        kinds = sorted(m["cpu_us_per_msg_by_kind"].items(), key=lambda kv: -kv[1])
        body.append([name, str(m["runs"]), str(m["messages"]), _f(m["msgs_per_sec"]),
                     _f(m["cpu_us_per_msg"]),
                     ", ".join(f"{k} {v:.0f}" for k, v in kinds if v >= 1)])
    if s.get("ratio_rate") is not None:
        body.append(["mailpool/Postfix", "", "", f"{s['ratio_rate']:.2f}x",
                     f"{s['ratio_cpu']:.2f}x", ""])
    return Table(["server", "runs", "messages", "msgs/s", "CPU us/msg",
                  "CPU us/msg by process kind"], body, right={1, 2, 3, 4})


def twohost_table(summary: dict[str, Any]) -> Table:
    """bench.twohost's setups: delivered/s, its ratio to one host with the file directory,
    CPU per delivered message in all and per process kind (summed over the hosts)."""
    setups = list(summary["setups"].values())
    kinds = [k for k in _kinds([s["cpu_us_per_msg_by_kind"] for s in setups])
             if any(s["cpu_us_per_msg_by_kind"].get(k, 0.0) >= 0.5 for s in setups)]
    base = summary["setups"].get("one-file", {}).get("delivered_per_sec")
    body = [[s["label"], str(s["hosts"]), str(s["runs"]), _f(s["delivered_per_sec"]),
             _f(_ratio(s["delivered_per_sec"], base), "{:.2f}"), _f(s["cpu_us_per_msg"]),
             *(_f(s["cpu_us_per_msg_by_kind"].get(k)) for k in kinds)] for s in setups]
    n = 6 + len(kinds)
    return Table(["setup", "hosts", "runs", "delivered/s", "x 1 host file", "CPU us/msg",
                  *kinds], body, right=set(range(1, n)))


def twohost_lines(summary: dict[str, Any]) -> list[str]:
    """The second host's gain and the shared directory's cost, in words."""
    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    out = [f"second host's gain (delivered/s): 2 hosts / 1 host with the file directory "
           f"{x(summary['gain_vs_file'])}; / 1 host with PostgreSQL {x(summary['gain_vs_pg'])}"]
    if summary.get("pg_cpu_extra_us") is not None:
        out.append(f"shared directory's cost (CPU per message, 1 host): PostgreSQL vs file "
                   f"{summary['pg_cpu_extra_us']:+.0f} us ({x(summary['pg_cpu_ratio'])})")
    return out


def dircalls_lines(report: dict[str, Any]) -> list[str]:
    """bench.directory_calls as text: one line per way and concurrency, then the ratios."""
    out = [f"pool of {report['pool_size']} connections either way, {report['users']} users, "
           f"{report['rounds']} run(s) of {report['seconds']:g} s per way and concurrency, "
           "medians"]
    for r in report["results"]:
        out.append(f"  concurrency {r['concurrency']:>2} {r['way']:<7}: "
                   f"{_f(r['lookups_per_sec'])} lookups/s, CPU {_f(r['cpu_us'])} us/lookup "
                   f"in this process, {_f(r.get('server_cpu_us'))} us in PostgreSQL")
    for conc, q in report["ratio_thread_to_asyncio"].items():
        out.append(f"  concurrency {conc:>2} thread/asyncio: lookups/s "
                   f"{_f(q['lookups_per_sec'], '{:.2f}')}x, CPU per lookup "
                   f"{_f(q['cpu_us'], '{:.2f}')}x (PostgreSQL "
                   f"{_f(q['server_cpu_us'], '{:.2f}')}x)")
    return out


def dircalls_table(report: dict[str, Any]) -> Table:
    """bench.directory_calls: each way at each concurrency, and thread / asyncio."""
    ratio = report.get("ratio_thread_to_asyncio", {})
    body = []
    for r in report["results"]:
        q = ratio.get(str(r["concurrency"]), {}) if r["way"] == "thread" else {}
        body.append([str(r["concurrency"]), r["way"], _f(r["lookups_per_sec"]),
                     _f(r["cpu_us"]), _f(r.get("server_cpu_us")),
                     _f(q.get("lookups_per_sec"), "{:.2f}") if q else "",
                     _f(q.get("cpu_us"), "{:.2f}") if q else ""])
    return Table(["concurrency", "way", "lookups/s", "CPU us/lookup (Trio process)",
                  "CPU us/lookup (PostgreSQL)", "thread/asyncio lookups/s",
                  "thread/asyncio CPU"], body, right={0, 2, 3, 4, 5, 6})


# --- targets ------------------------------------------------------------------------------


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 11's targets, each MET, MISSED or "n/a (why)", from this run's rows only."""
    out: list[dict[str, Any]] = []

    def add(tid: str, name: str, goal: str, ok: Callable[[float], bool], value: float | None,
            shown: str, detail: str, why_missing: str = "") -> None:
        if value is None:
            status = f"n/a ({why_missing or 'not measured'})"
        else:
            status = "MET" if ok(value) else "MISSED"
        out.append({"kind": "target", "id": tid, "name": name, "goal": goal, "value": value,
                    "measured": shown if value is not None else "-", "detail": detail,
                    "status": status})

    def dlv(r: dict[str, Any]) -> float | None:
        return r.get("delivered_per_sec")

    def spread(values: list[float], fmt: str = "{:.0f}") -> str:
        if len(values) < 2:
            return ""
        return f", {len(values)} runs {fmt.format(min(values))}-{fmt.format(max(values))}"

    def e2e(label: str) -> tuple[float | None, str, str]:
        (mp, mps), (pf, pfs) = (med(rows, s, label, HEADLINE, dlv) for s in ("mailpool", PEER))
        (gm, _), (gp, _) = (med(rows, s, label, SECOND, dlv) for s in ("mailpool", PEER))
        detail = (f"delivered/s {_f(mp)}{spread(mps)} vs Postfix {_f(pf)}{spread(pfs)} "
                  f"({HEADLINE}, medians); Trio generator {_f(_ratio(gm, gp), '{:.2f}x')} "
                  f"({_f(gm)} vs {_f(gp)})")
        why = "mailpool" if mp is None else "Postfix"
        return _ratio(mp, pf), detail, f"{why} not measured with {HEADLINE} at {label}"

    ratio, detail, why = e2e(TARGET_LABEL)
    for tid, goal in (("1", 1.0), ("1+", 1.5)):
        add(tid, f"end to end >= {goal:.1f}x Postfix ({TARGET_LABEL}, durable, {HEADLINE})"
            + (" [the goal beyond]" if tid == "1+" else ""), f">= {goal:.1f}x",
            lambda x, goal=goal: x >= goal, ratio, _f(ratio, "{:.2f}x"), detail, why)

    cpu, cpus = med(rows, "mailpool", TARGET_LABEL, HEADLINE, lambda r: r.get("cpu_us_per_msg"))
    done = runs(rows, "mailpool", TARGET_LABEL, HEADLINE)
    kinds = {k: median(r.get("cpu_us_per_msg_by_kind", {}).get(k, 0.0) for r in done)
             for k in _kinds([r.get("cpu_us_per_msg_by_kind", {}) for r in done])}
    gen, _ = med(rows, "mailpool", TARGET_LABEL, SECOND, lambda r: r.get("cpu_us_per_msg"))
    add("2", f"server CPU per delivered message <= {CPU_GOAL_US:,.0f} us, all mailpool "
        f"processes ({TARGET_LABEL}, {HEADLINE})", f"<= {CPU_GOAL_US:,.0f} us",
        lambda x: x <= CPU_GOAL_US, cpu, _f(cpu, "{:,.0f} us"),
        ", ".join(f"{k} {v:.0f}" for k, v in kinds.items() if v >= 0.5)
        + f" (medians{spread(cpus)})"
        + (f"; Trio generator runs {gen:,.0f} us" if gen is not None else ""),
        f"mailpool not measured with {HEADLINE} at {TARGET_LABEL}")

    ratio, detail, why = e2e(MANY_LABEL)
    add("3", f"100 messages per connection: >= 1.5x Postfix ({MANY_LABEL}, {HEADLINE})",
        ">= 1.5x", lambda x: x >= 1.5, ratio, _f(ratio, "{:.2f}x"), detail, why)

    def p99(r: dict[str, Any]) -> float | None:
        return r["result"].get("greeting_ms", {}).get("p99")

    (mp_g, mp_gs), (pf_g, pf_gs) = (med(rows, s, TARGET_LABEL, SECOND, p99)
                                    for s in ("mailpool", PEER))
    ratio = _ratio(mp_g, pf_g)
    add("4", f"connect-to-greeting p99 under the target load <= Postfix's ({TARGET_LABEL}, "
        "Trio generator: the client that times it)", "<= 1.0x", lambda x: x <= 1.0, ratio,
        _f(ratio, "{:.2f}x"),
        f"p99 {_f(mp_g, '{:.1f}')} ms{spread(mp_gs, '{:.1f}')} vs Postfix "
        f"{_f(pf_g, '{:.1f}')} ms{spread(pf_gs, '{:.1f}')} (medians)",
        f"{'mailpool' if mp_g is None else 'Postfix'} not measured")

    j = first(rows, "journal")
    cost = j.get("cost") if j else None
    add("5", f"journal on vs off: CPU per delivered message + < 5 % ({TARGET_LABEL}, "
        f"{HEADLINE})", "< 5 %", lambda x: x < 0.05, cost, _f(cost, "{:+.1%}"),
        (f"median {j['median_on']:,.0f} us on vs {j['median_off']:,.0f} us off over "
         f"{len(j['cpu_on'])}+{len(j['cpu_off'])} alternated runs" if j else "-"),
        "journal comparison not run")

    pops = {(r["server"], r["sessions"]): r["result"]["retr_per_sec"]
            for r in rows if r.get("kind") == "pop"}
    mp_pop, dv_pop = pops.get(("mailpool", 10)), pops.get(("dovecot", 10))
    ratio = _ratio(mp_pop, dv_pop)
    for tid, goal in (("6", 0.5), ("6+", 1.0)):
        add(tid, f"POP3 at 10 sessions >= {goal:.1f}x Dovecot (RETR/s)"
            + (" [the goal]" if tid == "6+" else ""), f">= {goal:.1f}x",
            lambda x, goal=goal: x >= goal, ratio, _f(ratio, "{:.2f}x"),
            f"RETR/s {_f(mp_pop)} vs Dovecot {_f(dv_pop)}",
            f"{'mailpool' if mp_pop is None else 'Dovecot'} not measured at 10 sessions")

    idle = first(rows, "idle")
    full = idle is not None and idle["bound"] >= IDLE_GOAL
    short = (f"only {idle['bound']:,} tried (--idle-bound); held {idle['held']:,}"
             if idle else "idle part not run")
    mem = (f"RSS {_f(idle.get('rss_kb_per_session'), '{:.1f}')} KiB, PSS "
           f"{_f(idle.get('pss_kb_per_session'), '{:.1f}')} KiB, sessions alone "
           f"{_f(idle.get('pss_kb_per_session_sessions_only'), '{:.1f}')} KiB per session; "
           + (", ".join(f"{n} {k} jobs started" for k, n in idle["new_processes"].items())
              or "no process started") if idle else "-")
    add("7a", f"default configuration holds >= {IDLE_GOAL:,} idle SMTP sessions",
        f">= {IDLE_GOAL:,}", lambda x: x >= IDLE_GOAL, idle["held"] if full else None,
        f"{idle['held']:,}" if idle else "-",
        f"{idle['held']:,}/{idle['bound']:,} greeted and held, ramp "
        f"{idle['ramp_seconds']:.0f} s" if idle else "-", short)
    per = idle.get("pss_kb_per_session") if full else None
    add("7b", f"memory per idle session < {IDLE_KB:.0f} KB: the server's PSS growth / "
        "sessions (the jobs started for them included)", f"< {IDLE_KB:.0f} KiB",
        lambda x: x < IDLE_KB, per, _f(per, "{:.1f} KiB"), mem, short)
    alone = idle.get("pss_kb_per_session_sessions_only") if full else None
    add("7b'", f"memory per idle session < {IDLE_KB:.0f} KB, sessions alone (the started "
        "jobs' own start-up size taken off)", f"< {IDLE_KB:.0f} KiB", lambda x: x < IDLE_KB,
        alone, _f(alone, "{:.1f} KiB"), mem, short)

    g = first(rows, "greeting-delay")
    worst: float | None = None
    why = "greeting-delay part not run"
    if g is not None:
        if g["held"] < GREETING_IDLE:
            why = f"only {g['held']} of {g['idle']} idle sessions held"
        elif g["with_idle_errors"]:
            worst = float("inf")  # a new client not greeted at all (timeout, refused)
        else:
            worst = g["with_idle_ms"].get("max")
    add("7c", f"{GREETING_IDLE:,} idle sessions open never delay a new client's greeting by "
        f"> {GREETING_MS:.0f} ms (max over the new clients)", f"<= {GREETING_MS:.0f} ms",
        lambda x: x <= GREETING_MS, worst, _f(worst, "{:.1f} ms"),
        (f"with idle open p99 {_f(g['with_idle_ms'].get('p99'), '{:.1f}')} max "
         f"{_f(g['with_idle_ms'].get('max'), '{:.1f}')} ms; alone p99 "
         f"{_f(g['alone_ms'].get('p99'), '{:.1f}')} max {_f(g['alone_ms'].get('max'), '{:.1f}')}"
         f" ms; {g['probes']} new clients each; errors {g['with_idle_errors'] or 'none'}"
         if g else "-"), why)
    return out


def targets_table(tg: list[dict[str, Any]]) -> Table:
    return Table(["#", "target", "goal", "measured", "verdict", "detail"],
                 [[t["id"], t["name"], t["goal"], t["measured"], t["status"], t["detail"]]
                  for t in tg], right={3})


# --- the printed report and the README block ----------------------------------------------

SMTP_INTRO = (
    "Each workload ran on every server in turn, all started together. accepted/s: 250 "
    "replies to the final dot per second; delivered/s: messages in the Maildir per second "
    "from the load's start to the last one; x pf: ratio to Postfix with the same client; "
    "greet: connect-to-greeting, DATA: DATA sent -> final 250, ms (the Trio generator times "
    "them, smtp-source does not); CPU: the server's whole process tree per delivered (else "
    "accepted) message, us; client CPU: the client's share of one CPU; runs: the targets' "
    "workloads ran several times on mailpool and Postfix, alternated, and the row shown is "
    "the run of median throughput (the targets take medians of each figure).")

Section = tuple[str, str, list[Table], list[str]]  # title, introduction, tables, notes


def sections(rows: list[dict[str, Any]], tg: list[dict[str, Any]]) -> list[Section]:
    """(title, introduction, tables, notes) for every part that ran, in report order."""
    out: list[Section] = []
    if any(r.get("kind") == "smtp" for r in rows):
        out.append(("SMTP, per server and workload", SMTP_INTRO, [smtp_table(rows)], []))
    cpu = cpu_table(rows)
    if cpu:
        out.append(("mailpool's CPU per message by process kind (us)",
                    "Summed per kind over the run; (N new): processes of that kind started "
                    "during the run; exited (...): processes that ended during it, counted "
                    "from their parent's cutime.", [cpu], []))
    greet, idle = greeting_table(rows), idle_table(rows)
    if greet or idle:
        out.append(("Idle sessions (mailpool, default configuration)",
                    "New clients' connect-to-greeting one at a time, alone and with idle "
                    "sessions held open; then as many idle sessions as the bound, with the "
                    "server's memory summed over its process tree. Sessions alone: the "
                    "processes started meanwhile taken off at their kind's size before.",
                    [t for t in (greet, idle) if t], []))
    journal = journal_table(rows)
    if journal:
        out.append(("Journal cost", f"mailpool with the journal on and off, {TARGET_LABEL}, "
                    f"{HEADLINE}, alternated runs: CPU per delivered message.", [journal], []))
    pop = pop_table(rows)
    if pop:
        out.append(("POP3 retrieval", "Each session logs in as its own user, RETRs every "
                    "message, QUITs, and again.", [pop], []))
    outbound = outbound_table(rows)
    if outbound:
        out.append(("Outbound", "bench.outbound: a full queue of 1 KB messages to 20 "
                    "smtp-sink MX hosts; medians of alternated runs; CPU from the release to "
                    "the empty queue.", [outbound], []))
    tls = first(rows, "tls-summary")
    if tls:
        out.append(("STARTTLS", f"{tls['label']}, every connection STARTTLS with a full "
                    "handshake, Trio generator; medians of alternated runs; CPU per accepted "
                    "message.", [tls_table(tls)], tls_kinds(tls)))
    shared = first(rows, "twohost-summary")
    if shared and shared["setups"]:
        out.append(("Two hosts sharing a PostgreSQL directory",
                    f"bench.twohost: {shared['label']} ({shared['client']}, "
                    f"{shared['messages']} messages a run) over 1 host or 2 (127.0.0.2 and "
                    "127.0.0.3, one mailbox root, one PostgreSQL directory) on this machine's "
                    "CPUs; cache_ttl at its default, so jobs answer the one recipient mostly "
                    "from their cache; medians of runs rotated round by round; CPU per "
                    "delivered message summed over the setup's hosts and, with PostgreSQL, "
                    "the database's processes (postgresql), us.", [twohost_table(shared)],
                    twohost_lines(shared)))
    calls = first(rows, "dircalls")
    if calls:
        out.append(("Directory calls from Trio: worker threads vs trio-asyncio",
                    f"bench.directory_calls: one-address lookups (SELECT ... WHERE "
                    f"lower(address) = ANY(%s)) by N Trio tasks, psycopg's ConnectionPool in "
                    f"trio.to_thread.run_sync vs its AsyncConnectionPool through "
                    f"trio_asyncio.aio_as_trio, {calls['pool_size']} connections either way; "
                    f"medians of {calls['rounds']} alternated run(s) of {calls['seconds']:g} s.",
                    [dircalls_table(calls)], []))
    skipped = [f"{r['server']}: {r['reason']}" for r in rows if r.get("kind") == "skipped"]
    if skipped:
        out.append(("Skipped", "", [], skipped))
    out.append(("Targets (issue 11; measured on this machine in this run)", "",
                [targets_table(tg)], []))
    return out


def print_report(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tg = targets(rows)
    lines: list[str] = []
    for title, intro, tables, notes in sections(rows, tg):
        lines += ["", f"== {title}"]
        if intro:
            lines.append(intro)
        for i, t in enumerate(tables):
            lines += ([""] if i else []) + t.text()
        lines += notes
    print("\n".join(lines), flush=True)
    return tg


def markdown(rows: list[dict[str, Any]], wall: float) -> str:
    """The README's "Latest figures" and "Targets", from this run."""
    meta = first(rows, "meta") or {}
    m = meta.get("machine", {})
    load = m.get("load") or [0.0]
    tg = [r for r in rows if r.get("kind") == "target"] or targets(rows)
    met = sum(t["status"] == "MET" for t in tg)
    missed = sum(t["status"] == "MISSED" for t in tg)
    lines = ["### Latest figures", "",
             f"From `make bench` started {meta.get('started', '?')}, on {m.get('cpus', '?')} "
             f"CPUs (Linux {m.get('kernel', '?')}), Python {m.get('python', '?')}, Postfix "
             f"{m.get('postfix') or '-'}, Dovecot {m.get('dovecot') or '-'}; load average "
             f"{load[0]:.1f} when it started (other work on the machine: compare ratios, "
             f"not absolute figures). The whole run took {wall / 60:.1f} minutes. smtp-source "
             "(Postfix's C client) is the headline client; the Trio generator is the second "
             "row of each server."]
    for title, intro, tables, notes in sections(rows, tg):
        if title.startswith("Targets"):
            continue
        lines += ["", f"#### {title}", ""]
        if intro:
            lines += [intro, ""]
        for t in tables:
            lines += [*t.markdown(), ""]
        lines += [f"- {n}" for n in notes]
    lines += ["", "### Targets", "",
              f"{met} met, {missed} missed, {len(tg) - met - missed} not measured in this run.",
              "", *targets_table(tg).markdown(), ""]
    return "\n".join(lines).replace("\n\n\n", "\n\n")


# --- the chart ----------------------------------------------------------------------------


def _matplotlib() -> Any:
    """Import matplotlib (Agg), installing it into this interpreter's environment if missing."""
    try:
        import matplotlib
    except ImportError:
        print("installing matplotlib for the chart (pip install matplotlib) ...", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"],
                           check=True, timeout=600, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"chart skipped: cannot install matplotlib: {exc}")
            return None
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    smtp = smtp_rows(rows)
    if not smtp:
        return None
    plt = _matplotlib()
    if plt is None:
        return None
    labels = _order([r["label"] for r in smtp])

    def name(r: dict[str, Any]) -> str:
        return f"{r['server']} ({r['client']})"

    series = _order([name(r) for r in smtp])

    def value(series_name: str, label: str, key: str) -> float:
        for r in smtp:
            if name(r) == series_name and r["label"] == label:
                if key == "rate":
                    return r["result"]["msgs_per_sec"]
                return r["result"].get("data_ms", {}).get("p99", 0.0)
        return 0.0

    fig, axes = plt.subplots(2, 1, figsize=(max(10, len(labels) * 2.2), 9), sharex=True)
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        axes[0].bar(xs, [value(s, lb, "rate") for lb in labels], width, label=s)
        axes[1].bar(xs, [value(s, lb, "p99") for lb in labels], width, label=s)
    axes[0].set_ylabel("accepted messages / s")
    axes[0].set_yscale("log")
    axes[0].set_title("SMTP throughput (higher is better)")
    axes[1].set_ylabel("DATA-to-250 p99 (ms)")
    axes[1].set_yscale("log")
    axes[1].set_title("DATA-to-250 p99 latency (lower is better; smtp-source measures none)")
    axes[1].set_xticks(range(len(labels)))
    axes[1].set_xticklabels(labels, rotation=30, ha="right")
    axes[0].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
