"""The device daemon: the wiring of state machine, store, trust, download, runtime, health and MQTT.

:class:`Daemon` (lifecycle) ties together the state keeper, the :mod:`.reporting` of phases, the
:mod:`.intake` of DesiredStates, the :mod:`.updater` steps (download, verify, install), the
:mod:`.probation` ticks with their rollback, the model :mod:`.models` slots and the
:mod:`.health_publisher`; one :mod:`.worker` thread makes every decision. Every step persists the
state before it reports, so a kill -9 at any point restarts into a consistent state.
"""

from .lifecycle import JOURNAL_DIR, Daemon, configure_logging, run

__all__ = ["JOURNAL_DIR", "Daemon", "configure_logging", "run"]
