"""How a Trio job should call psycopg: the synchronous pool in worker threads, or psycopg's
asyncio API through trio-asyncio. The figures behind mailpool.directory's choice.

    python -m bench.directory_calls [--dsn DSN] [--seconds S] [--rounds N] [--json]
    python -m bench.run --only dircalls    (also part of --only twohost)

Without --dsn a private cluster is started (tests/pghelp.py, through bench.pg) and destroyed.
The database gets USERS users of one address each, added through mailpool's own
PostgresDirectory (its schema, its indexes). A lookup is the same statement both ways, on a
pooled connection: SELECT ... WHERE lower(address) = ANY(%s) for one address, at random.

- thread: psycopg_pool.ConnectionPool, each lookup in trio.to_thread.run_sync under a
  deadline, as mailpool.directory.cached calls mailpool.directory.postgres;
- asyncio: psycopg_pool.AsyncConnectionPool in trio_asyncio.open_loop(), each lookup through
  trio_asyncio.aio_as_trio, as mailpool.plugins calls content checks.

Both pools have mailpool's default size per job ([directory] pool_size). At concurrency 1
and 20 (Trio tasks each looking up in a loop) each way runs --seconds, the ways alternated,
--rounds times; printed are the medians: lookups/s, and CPU per lookup of this process (the
Trio loop, its worker threads, the asyncio loop) and of the PostgreSQL server's processes.

trio_asyncio is imported before psycopg: psycopg binds asyncio.get_running_loop when it is
imported, and only the function trio-asyncio puts in its place sees trio-asyncio's loop.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from statistics import median
from typing import Any

import trio
import trio_asyncio  # before psycopg (see above): psycopg is imported in the functions

from bench.cpu import tree_cpu
from bench.report import dircalls_lines

USERS = 200
DOMAIN = "calls.bench.test"
CONCURRENCY = (1, 20)
WAYS = ("thread", "asyncio")
QUERY = ("SELECT u.name, u.password_hash, a.address FROM users u JOIN addresses a "
         "ON a.user_name = u.name WHERE lower(a.address) = ANY(%s)")
DEADLINE = 30.0  # seconds a lookup may take (mailpool's is connect + query timeout + 1)

Lookup = Callable[[str], Awaitable[list[tuple[Any, ...]]]]


def address(i: int) -> str:
    return f"user{i}@{DOMAIN}"


def pool_size() -> int:
    from mailpool.config.schema import DirectoryConfig

    return DirectoryConfig().pool_size


def fill(dsn: str, users: int) -> None:
    """users users (user0 ... with one address each) through PostgresDirectory itself."""
    from mailpool.directory.postgres import PostgresDirectory

    directory = PostgresDirectory(dsn)
    try:
        have = {u.name for u in directory.users()}
        for i in range(users):
            if f"user{i}" not in have:
                directory.add_user(f"user{i}", [address(i)], None)
    finally:
        directory.close()


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


async def drive(lookup: Lookup, concurrency: int, seconds: float, server_pid: int | None,
                ) -> dict[str, float]:
    """concurrency tasks looking up random addresses for seconds: lookups/s and CPU."""
    rng = random.Random(concurrency)
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            rows = await lookup(address(rng.randrange(USERS)))
            if len(rows) != 1:
                raise RuntimeError(f"lookup found {len(rows)} rows, not 1")
            done += 1

    server0 = tree_cpu([server_pid]) if server_pid else 0.0
    cpu0, t0 = own_cpu(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed, cpu = time.perf_counter() - t0, own_cpu() - cpu0
    out = {"lookups": done, "seconds": elapsed, "lookups_per_sec": done / elapsed,
           "cpu_us": cpu / done * 1e6}
    if server_pid:
        out["server_cpu_us"] = (tree_cpu([server_pid]) - server0) / done * 1e6
    return out


async def with_threads(dsn: str, size: int, run: Callable[[Lookup], Awaitable[Any]]) -> Any:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(dsn, min_size=size, max_size=size, open=False,
                          kwargs={"autocommit": True}, name="bench-thread")
    pool.open(wait=True)

    def blocking(addr: str) -> list[tuple[Any, ...]]:
        with pool.connection() as conn:
            return conn.execute(QUERY, ([addr],)).fetchall()

    async def lookup(addr: str) -> list[tuple[Any, ...]]:
        with trio.fail_after(DEADLINE):
            return await trio.to_thread.run_sync(blocking, addr, abandon_on_cancel=True)

    try:
        return await run(lookup)
    finally:
        pool.close()


async def with_asyncio(dsn: str, size: int, run: Callable[[Lookup], Awaitable[Any]]) -> Any:
    from psycopg_pool import AsyncConnectionPool

    async with trio_asyncio.open_loop():
        async def make() -> AsyncConnectionPool:
            pool = AsyncConnectionPool(dsn, min_size=size, max_size=size, open=False,
                                       kwargs={"autocommit": True}, name="bench-asyncio")
            await pool.open(wait=True)
            return pool

        pool = await trio_asyncio.aio_as_trio(make)()

        async def aio_lookup(addr: str) -> list[tuple[Any, ...]]:
            async with pool.connection() as conn:
                cur = await conn.execute(QUERY, ([addr],))
                return await cur.fetchall()

        call = trio_asyncio.aio_as_trio(aio_lookup)

        async def lookup(addr: str) -> list[tuple[Any, ...]]:
            with trio.fail_after(DEADLINE):
                return await call(addr)

        try:
            return await run(lookup)
        finally:
            await trio_asyncio.aio_as_trio(pool.close)()


async def sample(way: str, dsn: str, size: int, concurrency: int, seconds: float,
                 server_pid: int | None) -> dict[str, float]:
    """One measured run, after an unmeasured one (threads started, connections made)."""
    async def run(lookup: Lookup) -> dict[str, float]:
        await drive(lookup, concurrency, min(0.3, seconds), None)
        return await drive(lookup, concurrency, seconds, server_pid)

    opener = with_threads if way == "thread" else with_asyncio
    return await opener(dsn, size, run)


def summarise(samples: dict[tuple[str, int], list[dict[str, float]]]) -> list[dict[str, Any]]:
    out = []
    for (way, conc), runs in samples.items():
        row: dict[str, Any] = {"way": way, "concurrency": conc, "runs": len(runs),
                               "samples": runs}
        for key in ("lookups_per_sec", "cpu_us", "server_cpu_us"):
            values = [r[key] for r in runs if key in r]
            row[key] = median(values) if values else None
        out.append(row)
    return out


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per concurrency, thread / asyncio of each median."""
    by = {(r["way"], r["concurrency"]): r for r in results}
    out: dict[str, dict[str, float | None]] = {}
    for conc in sorted({r["concurrency"] for r in results}):
        t, a = by.get(("thread", conc)), by.get(("asyncio", conc))
        if t is None or a is None:
            continue
        out[str(conc)] = {k: t[k] / a[k] if t.get(k) is not None and a.get(k) else None
                          for k in ("lookups_per_sec", "cpu_us", "server_cpu_us")}
    return out


def measure(dsn: str, seconds: float, rounds: int, server_pid: int | None = None,
            users: int = USERS) -> dict[str, Any]:
    """The whole micro-benchmark on dsn's database: the users, then alternated runs."""
    fill(dsn, users)
    size = pool_size()
    samples: dict[tuple[str, int], list[dict[str, float]]] = {
        (w, c): [] for c in CONCURRENCY for w in WAYS}

    async def main() -> None:
        for rnd in range(rounds):
            for conc in CONCURRENCY:
                for way in WAYS if rnd % 2 == 0 else WAYS[::-1]:
                    samples[way, conc].append(
                        await sample(way, dsn, size, conc, seconds, server_pid))

    trio.run(main)
    results = summarise(samples)
    return {"kind": "dircalls", "users": users, "pool_size": size, "seconds": seconds,
            "rounds": rounds, "server_cpu": server_pid is not None, "results": results,
            "ratio_thread_to_asyncio": ratios(results)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.directory_calls",
                                description=__doc__.split("\n")[0])
    p.add_argument("--dsn", default="", help="a database to use (default: a private cluster)")
    p.add_argument("--server-pid", type=int, default=0,
                   help="the postmaster's pid, for the server's CPU (known with no --dsn)")
    p.add_argument("--seconds", type=float, default=1.0, help="per run (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="runs per way and concurrency")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args(argv)
    cluster = None
    dsn, pid = a.dsn, a.server_pid or None
    if not dsn:
        from bench.pg import postmaster_pid, start_cluster

        try:
            cluster = start_cluster()
        except Exception as exc:
            print(f"PostgreSQL cannot start: {exc}", file=sys.stderr)
            return 2
        dsn, pid = cluster.new_database("dircalls"), postmaster_pid(cluster)
    try:
        report = measure(dsn, a.seconds, a.rounds, pid)
    finally:
        if cluster is not None:
            cluster.destroy()
    text = "\n".join(dircalls_lines(report))
    print(json.dumps(report, separators=(",", ":")) if a.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
