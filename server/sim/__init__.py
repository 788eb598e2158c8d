"""The fleet simulator (``fleet simulate``): thousands of simulated devices over real MQTT.

Each simulated device has its own enrolled identity and mTLS connection and speaks the real
protocol (presence and will, director-verified DesiredStates, phase reports, health windows); a
:class:`~server.sim.profiles.Profile` says how a version behaves. Each worker process multiplexes
its clients on one selector (:mod:`server.sim.fleet`). See docs/architecture.md, "Fleet simulator".
"""

from server.sim.profiles import Profile, parse_profile

__all__ = ["Profile", "parse_profile"]
