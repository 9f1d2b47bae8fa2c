"""Text form of `mailpool pool show` (the source's DSPACTPJ display)."""

from __future__ import annotations

from typing import Any


def format_pool_text(entries: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for name, st in entries.items():
        p = st["parameters"]
        jobs, in_use, waiting = st["jobs"], st["in_use"], st["waiting"]
        lines += [
            f"Prestart job entry {name}",
            f"  initial {p['initial_jobs']}  threshold {p['threshold']}  additional "
            f"{p['additional_jobs']}  maximum {p['maximum_jobs']}  max use {p['max_use']}  "
            f"wait {'yes' if p['wait'] else 'no'}  sessions/job {p['sessions_per_job']}",
            f"  {'':24}{'current':>10}{'average':>10}{'peak':>8}",
            f"  {'Prestart jobs':24}{jobs['current']:>10}{jobs['average']:>10.2f}"
            f"{jobs['peak']:>8}",
            f"  {'Prestart jobs in use':24}{in_use['current']:>10}{in_use['average']:>10.2f}"
            f"{in_use['peak']:>8}",
            f"  {'Program start requests':24}{waiting['current']:>10}"
            f"{waiting['average']:>10.2f}{waiting['peak']:>8}   (waiting)",
            f"  Average wait time {waiting['average_wait_s']:.3f} s   "
            f"accepted {st['accepted']}   rejected {st['rejected']}",
            f"  Sessions: {st['sessions']['in_use']} taken of {st['sessions']['capacity']} "
            "the ready jobs can take",
            "",
        ]
    return "\n".join(lines)
