"""What the control socket (and the admin console) may ask of a running supervisor.

`pool show` / `pool change` (the source's DSPACTPJ / CHGPJE), `journal rotate` (CHGJRN),
`queue flush` and status. Each op is one method; requests and replies are plain JSON objects,
and a refusal is {"error": "..."} naming the entry, key and value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from mailpool import queue_edit
from mailpool.activity import Tally
from mailpool.config import ConfigError, load_config, pool_params
from mailpool.config.overlay import changed_params, overlay_path, update_overlay
from mailpool.framework.spool import SpoolError
from mailpool.journal.writer import NullJournal

_QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

if TYPE_CHECKING:
    from mailpool.supervisor.supervisor import Supervisor


class ControlOps:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.ops: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "pool-show": self.pool_show,
            "pool-change": self.pool_change,
            "pool-reset": self.pool_reset,
            "journal-rotate": self.journal_rotate,
            "queue-flush": self.queue_flush,
            "queue-submitted": self.queue_submitted,
            "queue-release": self.queue_release,
            "queue-delete": self.queue_delete,
            "queue-hold": self.queue_hold,
            "queue-requeue": self.queue_requeue,
            "status": self.status,
        }

    async def __call__(self, req: dict[str, Any]) -> dict[str, Any]:
        op = self.ops.get(req.get("op", ""))
        if op is None:
            return {"error": f"unknown op {req.get('op')!r}"}
        return await op(req)

    async def pool_show(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"entries": self.sup.pool_stats()}

    async def pool_change(self, req: dict[str, Any]) -> dict[str, Any]:
        """CHGPJE: applied at once and kept in the pool overlay beside the configuration
        file, so a reload or restart keeps it."""
        name = req["entry"]
        entry = self.sup.pools.entries.get(name)
        if entry is None:
            known = ", ".join(self.sup.pools.entries)
            return {"error": f"unknown pool entry {name!r} (known: {known})"}
        changes = dict(req["changes"])
        try:
            params = changed_params(name, entry.rules.params, changes)
        except ValueError as exc:
            return {"error": str(exc)}
        entry.rules.change(params)
        self.sup.record("JC", entry=name, detail=json.dumps(changes, sort_keys=True))
        entry.poke()
        reply = {"entry": name, "stats": entry.rules.stats()}
        return reply | self._keep(name, changes=changes)

    async def pool_reset(self, req: dict[str, Any]) -> dict[str, Any]:
        """Take `pool change` values out of the overlay (`keys`, or all of the entry's): the
        configuration file's values apply again, at once."""
        name = req["entry"]
        entry = self.sup.pools.entries.get(name)
        if entry is None:
            known = ", ".join(self.sup.pools.entries)
            return {"error": f"unknown pool entry {name!r} (known: {known})"}
        keys = list(req.get("keys") or [])
        kept = self._keep(name, reset=keys)
        if "warning" in kept:
            return {"error": kept["warning"]}
        try:
            loaded = load_config(self.sup.loaded.path)
        except ConfigError as exc:
            return {"error": f"the overlay was changed, but the configuration does not load: "
                             f"{exc}"}
        self.sup.loaded = msgspec.structs.replace(self.sup.loaded, overlay=loaded.overlay)
        params = pool_params(loaded.config, name)
        entry.rules.change(params)
        self.sup.record("JC", entry=name, detail=json.dumps({"reset": keys or "all"}))
        entry.poke()
        return {"entry": name, "stats": entry.rules.stats()} | kept

    def _keep(self, name: str, changes: dict[str, Any] | None = None,
              reset: list[str] | None = None) -> dict[str, Any]:
        """Write the change to the pool overlay; a warning when it could not be kept."""
        path = self.sup.loaded.path
        try:
            overlay = update_overlay(path, name, changes=changes, reset=reset)
        except (OSError, ConfigError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            return {"warning": f"applied, but not kept across reload or restart: "
                               f"{overlay_path(path)}: {why}"}
        self.sup.loaded = msgspec.structs.replace(self.sup.loaded, overlay=overlay)
        return {"overlay": str(overlay_path(path))}

    async def journal_rotate(self, req: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self.sup.journal, NullJournal):
            return {"error": "journaling is turned off ([journal] enabled = false)"}
        return {"path": str(self.sup.journal.rotate())}

    async def queue_flush(self, req: dict[str, Any]) -> dict[str, Any]:
        """Retry now: one message (`queue_id`), a domain's (`domain`), or everything."""
        count = self.sup.outbound.flush(domain=req.get("domain") or None,
                                        queue_id=req.get("queue_id") or None)
        return {"flushed": count}

    async def queue_submitted(self, req: dict[str, Any]) -> dict[str, Any]:
        """A program (sendmail, the API) put a message on the incoming queue, durably."""
        queue_id = str(req.get("queue_id", ""))
        if not _QUEUE_ID.fullmatch(queue_id):
            return {"error": f"bad queue id {queue_id!r}"}
        self.sup.work.put(queue_id)
        self.sup.activity.add(Tally(received=1))
        return {"queued": queue_id}

    async def queue_release(self, req: dict[str, Any]) -> dict[str, Any]:
        """A message kept by a filter (quarantine) or on hold goes on to delivery."""
        queue_id = str(req.get("queue_id", ""))
        if self.sup.busy_with(queue_id):
            return {"error": f"{queue_id} is being worked on right now: try again in a moment"}
        try:
            to, released = await trio.to_thread.run_sync(queue_edit.release, self.sup.spool,
                                                          queue_id)
        except (ValueError, SpoolError, OSError) as exc:
            return {"error": str(exc)}
        self.sup.record("QR", queue_id=queue_id, message_id=released.message_id,
                        detail=f"released by the operator to {to}")
        if to == "outbound":
            await self.sup.reload_outbound(queue_id)
        else:
            self.sup.work.put(queue_id)
        return {"released": queue_id, "queue": to}

    async def queue_delete(self, req: dict[str, Any]) -> dict[str, Any]:
        """Remove a message (or ALL) from whatever queue holds it."""
        return await self._change(req, queue_edit.delete, "QD", "deleted from {queue}")

    async def queue_hold(self, req: dict[str, Any]) -> dict[str, Any]:
        """Keep a message (or ALL) on the hold queue until `queue release`."""
        return await self._change(req, queue_edit.hold, "QH", "held (was in {queue})")

    async def queue_requeue(self, req: dict[str, Any]) -> dict[str, Any]:
        """Take a message through the framework again."""
        result = await self._change(req, queue_edit.requeue, "QQ", "requeued from {queue}")
        for queue_id in result.get("done", []):
            self.sup.work.put(queue_id, again=True)
        return result

    async def _change(self, req: dict[str, Any], change: Any, code: str,
                      detail: str) -> dict[str, Any]:
        """One operator change to queued mail, in a worker thread (files only), for one queue
        id or ALL; a message a job is working on right now is left alone and named."""
        queue_id = str(req.get("queue_id", ""))
        ids = (await trio.to_thread.run_sync(queue_edit.all_queued, self.sup.spool)
               if queue_id == "ALL"
               else [queue_id])
        done: list[str] = []
        was_in: dict[str, str] = {}  # queue id -> the queue it was in
        busy: list[str] = []
        errors: list[str] = []
        for qid in ids:
            if self.sup.busy_with(qid):
                busy.append(qid)
                continue
            try:
                queue, envelope = await trio.to_thread.run_sync(change, self.sup.spool, qid)
            except (ValueError, SpoolError, OSError) as exc:
                errors.append(str(exc))
                continue
            self.sup.outbound.forget(qid)
            self.sup.record(code, queue_id=qid, message_id=envelope.message_id,
                            detail=detail.format(queue=queue) + " by the operator")
            done.append(qid)
            was_in[qid] = queue
        if queue_id != "ALL" and not done:
            why = errors[0] if errors else (f"{queue_id} is being delivered right now: "
                                            "try again in a moment")
            return {"error": why}
        return {"done": done, "was_in": was_in, "busy": busy, "errors": errors}

    async def status(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.sup.status()
