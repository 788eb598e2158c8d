"""Metrics: the server's own counters plus those of other processes (ingest workers) merged in as
snapshots (merge_source), kept when a source goes away (retire_source)."""

from __future__ import annotations

from server.metrics import Metrics

RECEIVED = "fleet_mqtt_received_total"


def child(**counts: float) -> Metrics:
    """A worker process's Metrics with ``kind=<name>`` counters of RECEIVED."""
    m = Metrics()
    for kind, n in counts.items():
        m.inc(RECEIVED, n, help="device messages received", kind=kind)
    return m


def test_snapshot_is_a_copy_of_own_counters_and_help():
    m = child(report=3)
    counters, helps = m.snapshot()
    assert counters == {(RECEIVED, (("kind", "report"),)): 3.0}
    assert helps == {RECEIVED: "device messages received"}
    m.inc(RECEIVED, kind="report")
    assert counters[(RECEIVED, (("kind", "report"),))] == 3.0  # not a live view


def test_merge_source_adds_to_get_total_and_render():
    server = Metrics()
    server.inc(RECEIVED, 2, kind="report")
    server.inc("fleet_outbox_published_total", 5)
    server.merge_source("ingest-0", child(report=3, health=4).snapshot())

    assert server.get(RECEIVED, kind="report") == 5
    assert server.get(RECEIVED, kind="health") == 4  # only the source has it
    assert server.get(RECEIVED, kind="presence") == 0
    assert server.total(RECEIVED) == 9
    assert server.total("fleet_outbox_published_total") == 5
    text = server.render()
    assert f'{RECEIVED}{{kind="report"}} 5\n' in text
    assert f'{RECEIVED}{{kind="health"}} 4\n' in text
    assert "fleet_outbox_published_total 5\n" in text
    assert text.count(f"# TYPE {RECEIVED} counter") == 1


def test_several_sources_add_up():
    server = Metrics()
    server.merge_source("ingest-0", child(report=3).snapshot())
    server.merge_source("ingest-1", child(report=4, health=1).snapshot())
    assert server.get(RECEIVED, kind="report") == 7
    assert server.total(RECEIVED) == 8


def test_a_new_snapshot_of_a_source_replaces_its_previous_one():
    server = Metrics()
    server.inc(RECEIVED, 1, kind="report")
    worker = child(report=3)
    server.merge_source("ingest-0", worker.snapshot())
    assert server.get(RECEIVED, kind="report") == 4
    worker.inc(RECEIVED, 2, kind="report")
    server.merge_source("ingest-0", worker.snapshot())  # cumulative 5, not 3 + 5
    assert server.get(RECEIVED, kind="report") == 6
    assert server.total(RECEIVED) == 6
    server.merge_source("ingest-0", worker.snapshot())  # the same snapshot twice changes nothing
    assert server.get(RECEIVED, kind="report") == 6
    assert f'{RECEIVED}{{kind="report"}} 6\n' in server.render()


def test_retire_source_keeps_its_counts_and_a_successor_starts_from_zero():
    server = Metrics()
    server.inc(RECEIVED, 1, kind="report")
    server.merge_source("ingest-0", child(report=10, health=2).snapshot())
    seen = [server.total(RECEIVED)]
    assert seen == [13]

    server.retire_source("ingest-0")
    assert server.get(RECEIVED, kind="report") == 11
    assert server.get(RECEIVED, kind="health") == 2
    seen.append(server.total(RECEIVED))

    # the restarted process has the same source name and counts from zero again
    successor = Metrics()
    server.merge_source("ingest-0", successor.snapshot())  # empty: nothing lost
    seen.append(server.total(RECEIVED))
    successor.inc(RECEIVED, 1, kind="report")
    server.merge_source("ingest-0", successor.snapshot())
    seen.append(server.total(RECEIVED))
    assert server.get(RECEIVED, kind="report") == 12
    assert server.get(RECEIVED, kind="health") == 2

    server.retire_source("ingest-0")
    seen.append(server.total(RECEIVED))
    assert seen == [13, 13, 13, 14, 14]
    assert seen == sorted(seen)  # never down
    assert f'{RECEIVED}{{kind="report"}} 12\n' in server.render()


def test_retire_of_an_unknown_source_is_harmless():
    server = Metrics()
    server.inc(RECEIVED, kind="report")
    server.retire_source("ingest-7")
    assert server.total(RECEIVED) == 1


def test_help_texts_of_a_source_appear_in_render():
    server = Metrics()
    server.inc("fleet_outbox_published_total", help="DesiredStates published")
    worker = Metrics()
    worker.inc("fleet_mqtt_duplicates_total", help="duplicate device messages dropped")
    server.merge_source("ingest-0", worker.snapshot())
    text = server.render()
    assert "# HELP fleet_mqtt_duplicates_total duplicate device messages dropped\n" in text
    assert "# TYPE fleet_mqtt_duplicates_total counter\nfleet_mqtt_duplicates_total 1\n" in text
    assert "# HELP fleet_outbox_published_total DesiredStates published\n" in text
    # the help text stays after the source retires
    server.retire_source("ingest-0")
    assert "# HELP fleet_mqtt_duplicates_total duplicate device messages dropped\n" in server.render()


def test_the_servers_own_help_text_wins_over_a_sources():
    server = Metrics()
    server.inc(RECEIVED, help="server text", kind="report")
    server.merge_source("ingest-0", child(report=1).snapshot())
    text = server.render()
    assert f"# HELP {RECEIVED} server text\n" in text
    assert text.count(f"# HELP {RECEIVED}") == 1
