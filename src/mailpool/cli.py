"""The one `mailpool` command: serve, config, user, journal, pool.

Every subcommand takes `--config PATH` anywhere among its options. Errors a user can
cause print one line naming the file, key or value and exit non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from mailpool import __version__
from mailpool.config import (
    ConfigError,
    LoadedConfig,
    default_config_path,
    effective_toml,
    load_config,
)

Handler = Callable[[argparse.Namespace, LoadedConfig], int]


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", type=Path, default=None,
                        help="configuration file (default: $MAILPOOL_CONFIG, else "
                             "config/mailpool.toml here, else /etc/mailpool/mailpool.toml)")
    return parent


def _leaf(sub: argparse._SubParsersAction, name: str, handler: Handler,
          help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, parents=[_parent()], help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    return parser


# --- serve / config -------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    import msgspec

    from mailpool.supervisor.supervisor import serve

    if args.user is not None:
        cfg = loaded.config
        host = msgspec.structs.replace(cfg.host, user=args.user)
        loaded = msgspec.structs.replace(loaded,
                                         config=msgspec.structs.replace(cfg, host=host))
    return serve(loaded)


def cmd_config_check(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.config.overlay import overlay_path

    print(f"# {loaded.path}: OK (data directory {loaded.data_dir})")
    if loaded.overlay:
        print(f"# with `pool change` values from {overlay_path(loaded.path)} "
              "(`mailpool pool reset ENTRY` takes them out):")
        for entry, table in sorted(loaded.overlay.items()):
            for key, value in sorted(table.items()):
                print(f"#   pool.{entry}.{key} = {json.dumps(value)}")
    print(effective_toml(loaded.config), end="")
    return 0


# --- users (the source's WRKDIRE) -----------------------------------------------------


# --- journal (the source's DSPJRN / CHGJRN) -------------------------------------------


def cmd_journal_dump(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.journal.dump import run_dump

    return run_dump(args, loaded.journal_dir, sys.stdout)


def cmd_journal_rotate(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.supervisor.control import ControlUnavailable, request

    try:
        reply = request(loaded.control_socket, {"op": "journal-rotate"})
    except ControlUnavailable:
        # No running supervisor: attach the new receiver directly.
        from mailpool.journal.writer import JournalWriter

        writer = JournalWriter(loaded.journal_dir,
                               max_receiver_bytes=loaded.config.journal.receiver_max_bytes)
        writer.open()
        path = writer.rotate()
        writer.close()
        print(f"new receiver attached: {path}")
        return 0
    print(f"new receiver attached: {reply['path']}")
    return 0


# --- pool (the source's CHGPJE / DSPACTPJ) -----------------------------------------------


def cmd_pool_show(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.supervisor.control import ControlUnavailable, request
    from mailpool.supervisor.pool_report import format_pool_text

    try:
        reply = request(loaded.control_socket, {"op": "pool-show"})
    except ControlUnavailable as exc:
        raise CliError(f"no running mailpool at {loaded.control_socket}: {exc}") from None
    entries = reply["entries"]
    if args.entry:
        if args.entry not in entries:
            raise CliError(f"unknown pool entry {args.entry!r} (known: {', '.join(entries)})")
        entries = {args.entry: entries[args.entry]}
    if args.json:
        print(json.dumps({"entries": entries}))
    else:
        print(format_pool_text(entries), end="")
    return 0


_CHANGE_KEYS = ("initial_jobs", "threshold", "additional_jobs", "maximum_jobs", "max_use",
                "sessions_per_job", "deliveries_per_job", "wait_timeout", "idle_timeout")


_CHANGE_HELP = {
    "initial_jobs": "jobs started at start-up (and kept)",
    "threshold": "when fewer jobs than this are available, start more",
    "additional_jobs": "how many jobs to start each time",
    "maximum_jobs": "never more jobs than this",
    "max_use": "sessions a job serves before it is replaced",
    "sessions_per_job": "sessions one job serves at once",
    "deliveries_per_job": "smtp-client: deliveries one job runs at once",
    "wait_timeout": "how long a request is held for a free job",
    "idle_timeout": "a surplus idle job ends after this long",
}


def cmd_pool_change(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.supervisor.control import ControlUnavailable, request

    changes: dict[str, object] = {k: getattr(args, k) for k in _CHANGE_KEYS
                                  if getattr(args, k) is not None}
    if args.wait is not None:
        changes["wait"] = args.wait
    if args.start_jobs is not None:
        changes["start_jobs"] = args.start_jobs
    if not changes:
        raise CliError("pool change: name at least one value to change (see --help)")
    try:
        reply = request(loaded.control_socket,
                        {"op": "pool-change", "entry": args.entry, "changes": changes})
    except ControlUnavailable:
        return _pool_change_stopped(args, loaded, changes)
    print(f"{args.entry}: changed " + ", ".join(f"{k}={v}" for k, v in changes.items()))
    _report_overlay(reply)
    if args.json:
        print(json.dumps(reply))
    return 0


def _pool_change_stopped(args: argparse.Namespace, loaded: LoadedConfig,
                         changes: dict[str, object]) -> int:
    """With the host stopped, the change is checked and kept for its next start (CHGPJE
    changes the entry's description whether the subsystem runs or not)."""
    from mailpool.config import pool_params
    from mailpool.config.overlay import changed_params, overlay_path, update_overlay

    if args.entry not in loaded.config.pool:
        raise CliError(f"unknown pool entry {args.entry!r} "
                       f"(known: {', '.join(loaded.config.pool)})")
    try:
        changed_params(args.entry, pool_params(loaded.config, args.entry), changes)
        update_overlay(loaded.path, args.entry, changes=changes)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"{overlay_path(loaded.path)}: cannot write: {exc.strerror}") from None
    print(f"{args.entry}: changed " + ", ".join(f"{k}={v}" for k, v in changes.items())
          + " (the host is not running: applies when it starts)")
    print(f"kept in {overlay_path(loaded.path)}")
    return 0


def _report_overlay(reply: dict[str, object]) -> None:
    if "warning" in reply:
        print(f"mailpool: warning: {reply['warning']}", file=sys.stderr)
    elif "overlay" in reply:
        print(f"kept in {reply['overlay']} (across reload and restart; `mailpool pool reset` "
              "takes it out)")


def cmd_pool_reset(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.config.overlay import overlay_path, update_overlay
    from mailpool.supervisor.control import ControlUnavailable, request

    keys = [k.replace("-", "_") for k in args.keys]
    try:
        request(loaded.control_socket, {"op": "pool-reset", "entry": args.entry, "keys": keys})
    except ControlUnavailable:
        if args.entry not in loaded.config.pool:
            raise CliError(f"unknown pool entry {args.entry!r} "
                           f"(known: {', '.join(loaded.config.pool)})") from None
        try:
            update_overlay(loaded.path, args.entry, reset=keys)
        except OSError as exc:
            raise CliError(f"{overlay_path(loaded.path)}: cannot write: {exc.strerror}") from None
    print(f"{args.entry}: " + (", ".join(keys) if keys else "all changes")
          + f" taken out of {overlay_path(loaded.path)}; the configuration file's values apply")
    return 0


# --- queues (the source's QTMSOUTQ and retry queues; Postfix's postqueue) -------------------


def cmd_queue_list(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.framework.spool import Spool
    from mailpool.queue_view import mailq_text, queued

    if args.queue and args.queue not in Spool.QUEUES:
        raise CliError(f"--queue {args.queue!r}: not a queue (known: {', '.join(Spool.QUEUES)})")
    if not loaded.spool_dir.is_dir():
        rows: list[dict[str, object]] = []
    else:
        spool = Spool(loaded.spool_dir)
        rows = list(queued(spool, (args.queue,) if args.queue else Spool.QUEUES))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(mailq_text(rows), end="")
    return 0


def cmd_queue_flush(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.supervisor.control import ControlUnavailable, request

    req: dict[str, object] = {"op": "queue-flush"}
    if args.queue_id:
        req["queue_id"] = args.queue_id
    if args.domain:
        req["domain"] = args.domain
    try:
        reply = request(loaded.control_socket, req)
    except ControlUnavailable as exc:
        raise CliError(f"no running mailpool at {loaded.control_socket}: {exc}") from None
    what = args.queue_id or (f"for {args.domain}" if args.domain else "in all queues")
    print(f"{reply['flushed']} message(s) {what} due for delivery now")
    return 0


def _queue_change(loaded: LoadedConfig, op: str, queue_id: str) -> dict[str, object]:
    from mailpool.supervisor.control import ControlUnavailable, request

    try:
        return request(loaded.control_socket, {"op": op, "queue_id": queue_id})
    except ControlUnavailable as exc:
        raise CliError(f"no running mailpool at {loaded.control_socket}: {exc} (queue changes "
                       "go through the running host)") from None


def cmd_queue_release(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    _queue_change(loaded, "queue-release", args.queue_id)
    print(f"{args.queue_id}: released for delivery")
    return 0


def _report_change(reply: dict[str, object], what: str) -> int:
    done, busy, errors = (list(reply.get(k) or []) for k in ("done", "busy", "errors"))
    was_in = reply.get("was_in") or {}
    assert isinstance(was_in, dict)
    for qid in done:
        print(f"{qid}: " + what.format(queue=was_in.get(qid, "its queue")))
    for qid in busy:
        print(f"{qid}: being delivered right now, left alone (try again)")
    for error in errors:
        print(f"not changed: {error}", file=sys.stderr)
    if not done and not busy and not errors:
        print("no messages")
    return 0 if not errors else 1


def cmd_queue_delete(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    return _report_change(_queue_change(loaded, "queue-delete", args.queue_id),
                          "deleted from {queue}")


def cmd_queue_hold(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    return _report_change(_queue_change(loaded, "queue-hold", args.queue_id),
                          "on hold (was in {queue})")


def cmd_queue_requeue(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    return _report_change(_queue_change(loaded, "queue-requeue", args.queue_id),
                          "back on the incoming queue (was in {queue})")


def cmd_queue_show(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.framework.spool import Spool
    from mailpool.queue_view import show

    spool = Spool(loaded.spool_dir)
    part = "headers" if args.headers else "body" if args.body else "all"
    try:
        sys.stdout.write(show(spool, args.queue_id, part))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return 0



# --- sendmail (mail from programs; also the `sendmail` console script) --------------------


def cmd_sendmail(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from mailpool.sendmail import run

    return run(args, loaded)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailpool", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mailpool {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _leaf(sub, "serve", cmd_serve, "start the mail host (supervisor, pools, listeners)")
    p.add_argument("--user", help="started as root, run as this user (overrides [host] user; "
                                  "root: do not drop)")

    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    _leaf(config, "check", cmd_config_check, "validate and print the effective configuration")

    from mailpool.cli_directory import add_directory_commands, add_user_commands

    add_user_commands(sub)
    add_directory_commands(sub)

    journal = sub.add_parser("journal", help="mail journal (DSPJRN, CHGJRN)").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    from mailpool.journal.dump import add_dump_arguments

    add_dump_arguments(_leaf(journal, "dump", cmd_journal_dump, "display journal records"))
    _leaf(journal, "rotate", cmd_journal_rotate, "attach a new journal receiver")

    queue = sub.add_parser("queue", help="mail queues (postqueue)").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    p = _leaf(queue, "list", cmd_queue_list,
              "list queued messages (read from the spool; works with the host stopped)")
    p.add_argument("--queue", help="only this queue (incoming, outbound, retry1, retry2, hold, "
                                   "busy, quarantine)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line, with postqueue -j's field names")
    p = _leaf(queue, "flush", cmd_queue_flush,
              "deliver deferred mail now, through the running host")
    p.add_argument("queue_id", nargs="?", help="only this message")
    p.add_argument("--domain", help="only mail for this domain")
    p = _leaf(queue, "release", cmd_queue_release,
              "deliver a message kept in quarantine (by a filter) or on hold (journaled QR)")
    p.add_argument("queue_id", help="the message's queue id")
    p = _leaf(queue, "delete", cmd_queue_delete,
              "delete a message (or ALL) from its queue (journaled QD)")
    p.add_argument("queue_id", help="a queue id, or ALL")
    p = _leaf(queue, "hold", cmd_queue_hold,
              "keep a message (or ALL) on hold until `queue release` (journaled QH)")
    p.add_argument("queue_id", help="a queue id, or ALL")
    p = _leaf(queue, "requeue", cmd_queue_requeue,
              "take a message through the framework again (journaled QQ)")
    p.add_argument("queue_id", help="the message's queue id (as `queue list` shows it)")
    p = _leaf(queue, "show", cmd_queue_show,
              "a message's envelope, each recipient's state and the message (as postcat -q); "
              "works with the host stopped")
    p.add_argument("queue_id", help="the message's queue id (as `queue list` shows it)")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--headers", action="store_true", help="only the message's headers")
    part.add_argument("--body", action="store_true", help="only the message's body")

    from mailpool.sendmail import add_arguments as add_sendmail_arguments

    add_sendmail_arguments(_leaf(sub, "sendmail", cmd_sendmail,
                                 "submit a message from a program (Postfix sendmail's options "
                                 "and exit codes)"))

    pool = sub.add_parser("pool", help="prestart job entries (CHGPJE, DSPACTPJ)").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    p = _leaf(pool, "show", cmd_pool_show, "statistics of the prestart job entries")
    p.add_argument("entry", nargs="?", help="only this entry (smtp-server, pop-server, "
                                            "framework, smtp-client)")
    p.add_argument("--json", action="store_true", help="the stable JSON shape for scripts")
    p = _leaf(pool, "change", cmd_pool_change, "change a prestart job entry on the running host")
    p.add_argument("entry", help="the entry to change (smtp-server, pop-server, framework, "
                                 "smtp-client)")
    for key in _CHANGE_KEYS:
        kind = float if key.endswith("timeout") else int
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=kind,
                       metavar="SECONDS" if kind is float else "N", help=_CHANGE_HELP[key])
    p.add_argument("--wait", dest="wait", action="store_const", const=True, default=None,
                   help="at the maximum, hold new requests until a job frees up")
    p.add_argument("--no-wait", dest="wait", action="store_const", const=False,
                   help="at the maximum, refuse new requests at once (421)")
    p.add_argument("--start-jobs", dest="start_jobs", action="store_const", const=True,
                   default=None, help="start the initial jobs at start-up")
    p.add_argument("--no-start-jobs", dest="start_jobs", action="store_const", const=False,
                   help="start jobs only on the first request")
    p.add_argument("--json", action="store_true", help="print the entry's statistics as JSON")
    p = _leaf(pool, "reset", cmd_pool_reset,
              "undo `pool change`: the configuration file's values apply again")
    p.add_argument("entry", help="the entry (smtp-server, pop-server, framework, smtp-client)")
    p.add_argument("keys", nargs="*", metavar="KEY",
                   help="only these keys (e.g. maximum_jobs); all of the entry's when none")
    return parser


def main(argv: list[str] | None = None) -> int:
    from mailpool.directory import DirectoryError
    from mailpool.supervisor.control import ControlError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        loaded = load_config(args.config or default_config_path())
        return args.handler(args, loaded)
    except (ConfigError, CliError, DirectoryError, ControlError) as exc:
        print(f"mailpool: {exc}", file=sys.stderr)
        return 1
    except EOFError:
        # e.g. `user passwd NAME </dev/null`: a prompt with nothing to read.
        print("mailpool: no input (end of file) where a value was expected", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except OSError as exc:
        # An unusable data directory, a full disk, a permission: one line, no traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mailpool: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # `python -m mailpool.cli`: run the imported module's main, so that the CliError the
    # command modules import (from mailpool.cli) is the one main() catches.
    from mailpool.cli import main as _main

    sys.exit(_main())
