"""The driver's printed report (one table, ratios against mailpool, targets) and its chart."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGET_LABEL = "20s 1KB k=1"
BASE = "mailpool"  # the configuration ratios are taken against


def _f(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows if r)]) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    out = [fmt(headers), fmt(["-" * w for w in widths])]
    out += [fmt(r) if r else "" for r in rows]
    return out


def smtp_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind") == "smtp" and "error" not in r["result"]]


def _find(rows: list[dict[str, Any]], server: str, label: str, client: str = "smtp_load",
          ) -> dict[str, Any] | None:
    for r in smtp_rows(rows):
        if r["server"] == server and r["label"] == label and r["client"] == client:
            return r
    return None


def smtp_table(rows: list[dict[str, Any]]) -> list[str]:
    smtp = [r for r in rows if r.get("kind") == "smtp" and not r["server"].startswith(
        "mailpool journal")]
    labels: list[str] = []
    for r in smtp:
        if r["label"] not in labels:
            labels.append(r["label"])
    body: list[list[str]] = []
    for label in labels:
        if body:
            body.append([])
        base = _find(rows, BASE, label)
        base_acc = base["result"]["msgs_per_sec"] if base else None
        base_del = base.get("delivered_per_sec") if base else None
        for r in (x for x in smtp if x["label"] == label):
            res = r["result"]
            if "error" in res:
                body.append([label, r["server"], r["client"], "-", "-", "-", "-", "-", "-", "-",
                             "-", "-", "ERROR: " + res["error"][:60]])
                continue
            g, d = res.get("greeting_ms", {}), res.get("data_ms", {})
            errs = ", ".join(f"{k}:{v}" for k, v in res.get("errors", {}).items())
            acc, dlv = res["msgs_per_sec"], r.get("delivered_per_sec")
            if "delivered" in r and dlv is None:
                dlv_text = f"{r['delivered']}/{res['sent']}!"
            else:
                dlv_text = _f(dlv)
            body.append([
                label, r["server"], r["client"], str(res["sent"]), _f(acc),
                _f(_ratio(acc, base_acc), "{:.2f}"), dlv_text,
                _f(_ratio(dlv, base_del), "{:.2f}"),
                _f(g.get("p50"), "{:.1f}"), _f(g.get("p99"), "{:.1f}"),
                _f(d.get("p50"), "{:.1f}"), _f(d.get("p99"), "{:.1f}"), errs,
            ])
    headers = ["workload", "server", "client", "sent", "accepted/s", "x mp", "delivered/s",
               "x mp", "greet p50", "greet p99", "DATA p50", "DATA p99", "errors"]
    return _table(headers, body, right=set(range(3, 12)))


def idle_table(rows: list[dict[str, Any]]) -> list[str]:
    body = []
    for r in (x for x in rows if x.get("kind") == "idle"):
        b, a = r["before"], r["after"]
        warm = r.get("warm") or {}
        body.append([r["server"], f"{r['held']}/{r['bound']}", f"{r['ramp_seconds']:.1f}",
                     f"{b['rss_kb'] / 1024:.1f} -> {a['rss_kb'] / 1024:.1f}",
                     _f(r.get("rss_kb_per_session"), "{:.1f}"),
                     _f(r.get("pss_kb_per_session"), "{:.1f}"),
                     f"{b['processes']} -> {a['processes']}",
                     f"{warm['held']}/{warm['bound']}" if warm else "-",
                     _f(warm.get("rss_kb_per_session"), "{:.1f}"),
                     _f(warm.get("pss_kb_per_session"), "{:.1f}")])
    if not body:
        return []
    return _table(["server", "held", "ramp s", "RSS MiB before -> after", "KiB/sess RSS",
                   "KiB/sess PSS", "processes", "warm held", "warm RSS", "warm PSS"], body,
                  right={1, 2, 4, 5, 7, 8, 9})


def pop_table(rows: list[dict[str, Any]]) -> list[str]:
    pops = [r for r in rows if r.get("kind") == "pop"]
    body = []
    for r in pops:
        res = r["result"]
        base = next((x for x in pops if x["server"] == BASE and x["sessions"] == r["sessions"]),
                    None)
        ratio = _ratio(res["retr_per_sec"], base["result"]["retr_per_sec"] if base else None)
        body.append([r["server"], str(r["sessions"]), str(res["retrieved"]),
                     _f(res["retr_per_sec"]), _f(ratio, "{:.2f}"), f"{res['mb_per_sec']:.1f}",
                     _f(res["login_ms"].get("p99"), "{:.1f}"),
                     _f(res["retr_ms"].get("p99"), "{:.2f}"),
                     ", ".join(f"{k}:{v}" for k, v in res["errors"].items())])
    if not body:
        return []
    return _table(["server", "sessions", "RETRs", "RETR/s", "x mp", "MB/s", "login p99",
                   "RETR p99", "errors"], body, right={1, 2, 3, 4, 5, 6, 7})


def tls_table(summary: dict[str, Any]) -> list[str]:
    """The STARTTLS section's medians (a "tls-summary" row): one line a server, then the
    ratio mailpool/Postfix, then each server's CPU per message by process kind."""
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
    out = _table(["server", "runs", "handshakes/s", "accepted/s", "delivered/s",
                  "STARTTLS p50", "STARTTLS p99", "CPU us/msg", "client CPU %", "errors"],
                 body, right=set(range(1, 9)))
    for name in ("mailpool", "postfix"):
        kinds = sorted(((summary.get(name) or {}).get("cpu_us_per_msg_by_kind") or {}).items(),
                       key=lambda kv: -kv[1])
        if kinds:
            out.append(f"{name} CPU us/msg by process kind: "
                       + ", ".join(f"{k} {v:.0f}" for k, v in kinds if v >= 1))
    return out


def targets(rows: list[dict[str, Any]], spj: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, goal: str, ok: Callable[[float], bool], ratio: float | None,
            detail: str, why_missing: str = "") -> None:
        if ratio is None:
            status = f"n/a ({why_missing or 'not measured'})"
        else:
            status = "MET" if ok(ratio) else "MISSED"
        out.append({"kind": "target", "name": name, "goal": goal, "ratio": ratio,
                    "detail": detail, "status": status})

    aio = _find(rows, "aiosmtpd-fsync", TARGET_LABEL)
    pf_gen = _find(rows, "postfix", TARGET_LABEL)
    for mp_label in (BASE, f"{BASE} spj={spj}"):
        mp = _find(rows, mp_label, TARGET_LABEL)
        mp_acc = mp["result"]["msgs_per_sec"] if mp else None
        missing = "mailpool not measured" if mp is None else ""
        # End to end, like with like: each client's mailpool figure against its Postfix one.
        for client in ("smtp_load", "smtp-source"):
            mpc = _find(rows, mp_label, TARGET_LABEL, client)
            pfc = _find(rows, "postfix", TARGET_LABEL, client)
            mp_del = mpc.get("delivered_per_sec") if mpc else None
            pf_del = pfc.get("delivered_per_sec") if pfc else None
            if client == "smtp-source" and mpc is None and pfc is None:
                continue
            add(f"{mp_label}: durable end to end >= 1.5x Postfix ({TARGET_LABEL}, {client})",
                ">= 1.5", lambda x: x >= 1.5, _ratio(mp_del, pf_del),
                f"delivered/s {_f(mp_del)} vs Postfix {_f(pf_del)}",
                (f"{mp_label} not measured with {client}" if mp_del is None else "")
                or f"Postfix not measured with {client}")
        aio_acc = aio["result"]["msgs_per_sec"] if aio else None
        add(f"{mp_label}: accepted/s >= 2x aiosmtpd-fsync ({TARGET_LABEL})", ">= 2.0",
            lambda x: x >= 2.0, _ratio(mp_acc, aio_acc),
            f"accepted/s {_f(mp_acc)} vs aiosmtpd-fsync {_f(aio_acc)}",
            missing or ("aiosmtpd-fsync not measured" if aio is None else ""))
        mp_g = mp["result"]["greeting_ms"].get("p99") if mp else None
        pf_g = pf_gen["result"]["greeting_ms"].get("p99") if pf_gen else None
        add(f"{mp_label}: connect-to-greeting p99 no worse than Postfix ({TARGET_LABEL})",
            "<= 1.0", lambda x: x <= 1.0, _ratio(mp_g, pf_g),
            f"p99 {_f(mp_g, '{:.1f}')} ms vs Postfix {_f(pf_g, '{:.1f}')} ms",
            missing or ("Postfix not measured" if pf_g is None else ""))
    journal = next((r for r in rows if r.get("kind") == "journal"), None)
    cost = journal.get("cost") if journal else None
    add("journal on costs < 5% throughput", "< 0.05", lambda x: x < 0.05, cost,
        (f"median accepted/s on {journal['median_on']:.0f} vs off {journal['median_off']:.0f}"
         if journal else "-"), "journal comparison not run")
    idle = next((r for r in rows if r.get("kind") == "idle"
                 and r["server"] == f"{BASE} spj={spj}"), None)
    # Cold: the fresh server, so the jobs it starts to hold the sessions count. Warm: the
    # same test again at once, with those jobs still running: a session's own cost.
    for phase in ("cold", "warm"):
        stats = (idle if phase == "cold" else idle.get("warm")) if idle else None
        per = stats.get("rss_kb_per_session") if stats else None
        add(f"memory per idle session < 50 KB (sessions_per_job={spj}, {phase})", "< 50 KiB",
            lambda x: x < 50, per,
            (f"{_f(per, '{:.1f}')} KiB RSS/session over {stats['held']} sessions "
             f"(PSS {_f(stats.get('pss_kb_per_session'), '{:.1f}')})" if stats else "-"),
            "mailpool not measured" if idle is None else "warm pass not run (--quick)")
    return out


def print_report(rows: list[dict[str, Any]], spj: int) -> list[dict[str, Any]]:
    lines = ["", "== SMTP (accepted/s = 250 replies to DATA per second; delivered/s = messages "
             "in the Maildir per second from the first connection; x mp = ratio to mailpool "
             "default; latencies in ms)"]
    lines += smtp_table(rows)
    idle = idle_table(rows)
    if idle:
        lines += ["", "== Idle capacity (silent sessions held with a 220 greeting; memory "
                  "summed over the server's process tree)", *idle]
    journal = next((r for r in rows if r.get("kind") == "journal"), None)
    if journal:
        lines += ["", f"== Journal cost ({journal['label']}, medians of "
                  f"{len(journal['on'])} alternated runs)",
                  f"journal on {journal['median_on']:.0f}/s, off {journal['median_off']:.0f}/s: "
                  f"cost {journal['cost'] * 100:+.1f}%"]
    pop = pop_table(rows)
    if pop:
        lines += ["", "== POP3 retrieval (each session logs in as its own user, RETRs every "
                  "message, QUITs, again)", *pop]
    tls = next((r for r in rows if r.get("kind") == "tls-summary"), None)
    if tls:
        lines += ["", f"== STARTTLS ({tls['label']}, every connection: EHLO, STARTTLS, "
                  "handshake, EHLO, one message; medians of alternated runs; handshakes/s = "
                  "completed handshakes over the run's wall time; STARTTLS p50/p99 = STARTTLS "
                  "sent -> handshake done, ms; CPU = the server's processes from the load's "
                  "start to the last delivery, per accepted message; client CPU = the "
                  "generator's share of one CPU)", *tls_table(tls)]
    skipped = [r for r in rows if r.get("kind") == "skipped"]
    if skipped:
        lines += ["", "== Skipped"] + [f"{r['server']}: {r['reason']}" for r in skipped]
    tg = targets(rows, spj)
    lines += ["", "== Targets (measured on this machine in this run)"]
    width = max(len(t["name"]) for t in tg)
    for t in tg:
        ratio = _f(t["ratio"], "{:.2f}")
        lines.append(f"{t['name']:<{width}}  goal {t['goal']:<8} measured {ratio:>6}  "
                     f"{t['status']:<7} {t['detail']}")
    print("\n".join(lines), flush=True)
    return tg


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
    smtp = [r for r in smtp_rows(rows) if not r["server"].startswith("mailpool journal")]
    if not smtp:
        return None
    plt = _matplotlib()
    if plt is None:
        return None
    labels: list[str] = []
    series: list[str] = []
    for r in smtp:
        if r["label"] not in labels:
            labels.append(r["label"])
        name = r["server"] if r["client"] == "smtp_load" else f"{r['server']} ({r['client']})"
        if name not in series:
            series.append(name)

    def value(name: str, label: str, key: str) -> float:
        for r in smtp:
            n = r["server"] if r["client"] == "smtp_load" else f"{r['server']} ({r['client']})"
            if n == name and r["label"] == label:
                if key == "rate":
                    return r["result"]["msgs_per_sec"]
                return r["result"].get("data_ms", {}).get("p99", 0.0)
        return 0.0

    fig, axes = plt.subplots(2, 1, figsize=(max(10, len(labels) * 1.6), 9), sharex=True)
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        axes[0].bar(xs, [value(name, lb, "rate") for lb in labels], width, label=name)
        axes[1].bar(xs, [value(name, lb, "p99") for lb in labels], width, label=name)
    axes[0].set_ylabel("accepted messages / s")
    axes[0].set_yscale("log")
    axes[0].set_title("SMTP throughput (higher is better)")
    axes[1].set_ylabel("DATA-to-250 p99 (ms)")
    axes[1].set_yscale("log")
    axes[1].set_title("DATA-to-250 p99 latency (lower is better; smtp-source measures none)")
    axes[1].set_xticks(range(len(labels)))
    axes[1].set_xticklabels(labels, rotation=30, ha="right")
    axes[0].legend(fontsize=8, ncol=2)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
