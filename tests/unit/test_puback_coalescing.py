"""The server's consuming link joins a run of queued PUBACKs into one write (server/mqtt/bridge.py)."""

from __future__ import annotations

from collections import deque

from server.mqtt.bridge import CoalescingClient

PUBACK, PUBLISH = 0x40, 0x30


def _pkt(command: int, data: bytes, pos: int = 0) -> dict:
    return {"command": command, "mid": 1, "qos": 1, "pos": pos, "to_process": len(data) - pos,
            "packet": data, "info": None}  # fmt: skip


def test_a_run_of_pubacks_at_the_head_becomes_one_packet_in_order():
    acks = [bytes([0x40, 2, 0, mid]) for mid in (1, 2, 3, 4)]
    q = deque([_pkt(PUBACK, acks[0]), _pkt(PUBACK, acks[1]), _pkt(PUBACK, acks[2]), _pkt(PUBLISH, b"P"),
               _pkt(PUBACK, acks[3])])  # fmt: skip
    CoalescingClient._join_pubacks(q)
    assert [p["packet"] for p in q] == [acks[0] + acks[1] + acks[2], b"P", acks[3]]
    head = q[0]
    assert (head["command"], head["pos"], head["to_process"], head["info"]) == (PUBACK, 0, 12, None)


def test_nothing_changes_without_a_run_or_with_a_partly_written_head():
    single = deque([_pkt(PUBACK, b"A"), _pkt(PUBLISH, b"P")])
    before = list(single)
    CoalescingClient._join_pubacks(single)
    assert list(single) == before
    started = deque([_pkt(PUBACK, b"\x40\x02\x00\x01", pos=2), _pkt(PUBACK, b"\x40\x02\x00\x02")])
    before = list(started)
    CoalescingClient._join_pubacks(started)
    assert list(started) == before  # a packet paho began to write is finished first, alone
