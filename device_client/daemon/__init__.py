"""The device daemon: the wiring of state machine, store, trust, download, runtime, health and MQTT.

:class:`Daemon` (lifecycle) ties together the state keeper, the :mod:`.reporting` of phases, the
:mod:`.intake` of DesiredStates (steps 1-2), the :mod:`.updater` (3-5: download, verify, install),
:mod:`.probation` (6, with its rollback), the model :mod:`.models` slots and the
:mod:`.health_publisher`; one :mod:`.worker` thread makes every decision. Every step persists the
state before it reports, so a kill -9 at any point restarts into a consistent state.
"""

from .lifecycle import JOURNAL_DIR, Daemon, configure_logging, run

__all__ = ["JOURNAL_DIR", "Daemon", "configure_logging", "run"]
