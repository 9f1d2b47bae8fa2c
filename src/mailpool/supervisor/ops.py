"""What the control socket (and the admin console) may ask of a running supervisor.

`pool show` / `pool change` (the source's DSPACTPJ / CHGPJE), `journal rotate` (CHGJRN),
`queue flush` and status. Each op is one method; requests and replies are plain JSON objects,
and a refusal is {"error": "..."} naming the entry, key and value.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from mailpool.config import PoolParams
from mailpool.journal.writer import NullJournal

if TYPE_CHECKING:
    from mailpool.supervisor.supervisor import Supervisor


class ControlOps:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.ops: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "pool-show": self.pool_show,
            "pool-change": self.pool_change,
            "journal-rotate": self.journal_rotate,
            "queue-flush": self.queue_flush,
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
        name = req["entry"]
        entry = self.sup.pools.entries.get(name)
        if entry is None:
            known = ", ".join(self.sup.pools.entries)
            return {"error": f"unknown pool entry {name!r} (known: {known})"}
        changes = dict(req["changes"])
        capacity = entry.role.capacity_key
        if capacity is not None:
            # smtp-client jobs run deliveries: their slot count has its own name.
            if "sessions_per_job" in changes:
                return {"error": f"{name}: sessions_per_job: {name} jobs run deliveries, not "
                                 f"sessions: change {capacity[1]}"}
            if capacity[1] in changes:
                changes["sessions_per_job"] = changes.pop(capacity[1])
        current = msgspec.structs.asdict(entry.rules.params)
        unknown = set(changes) - set(current)
        if unknown:
            return {"error": f"unknown key(s) {', '.join(sorted(unknown))}"}
        try:
            params = msgspec.convert({**current, **changes}, PoolParams)
        except msgspec.ValidationError as exc:
            return {"error": f"{name}: {exc}"}
        problems = params.problems()
        if problems:
            key, value, why = problems[0]
            if capacity is not None and key == "sessions_per_job":
                key = capacity[1]
            return {"error": f"{name}: {key}: {value!r}: {why}"}
        entry.rules.change(params)
        self.sup.record("JC", entry=name, detail=json.dumps(req["changes"], sort_keys=True))
        entry.poke()
        return {"entry": name, "stats": entry.rules.stats()}

    async def journal_rotate(self, req: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self.sup.journal, NullJournal):
            return {"error": "journaling is turned off ([journal] enabled = false)"}
        return {"path": str(self.sup.journal.rotate())}

    async def queue_flush(self, req: dict[str, Any]) -> dict[str, Any]:
        """Retry now: one message (`queue_id`), a domain's (`domain`), or everything."""
        count = self.sup.outbound.flush(domain=req.get("domain") or None,
                                        queue_id=req.get("queue_id") or None)
        return {"flushed": count}

    async def status(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.sup.status()
