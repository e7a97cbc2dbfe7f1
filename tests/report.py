"""The fault tests' tally (scenario x broker -> sent/done/lost/duplicated), printed after the run."""

from __future__ import annotations

ROWS: list[dict[str, object]] = []


def add(scenario: str, broker: str, sent: int, done: int, duplicated: int, note: str = "") -> None:
    ROWS.append({"scenario": scenario, "broker": broker, "sent": sent, "done": done,
                 "lost": sent - done, "duplicated": duplicated, "note": note})


def table() -> str:
    head = "| scenario | broker | sent | done | lost | duplicated | note |\n|---|---|---|---|---|---|---|"
    lines = [f"| {r['scenario']} | {r['broker']} | {r['sent']} | {r['done']} | {r['lost']} | "
             f"{r['duplicated']} | {r['note']} |" for r in ROWS]
    return "\n".join([head, *lines])
