"""The fleet simulator (``fleet simulate``): thousands of simulated devices over real MQTT.

Each simulated device has its own identity (a key made on the "device", a certificate issued by the
fleet CA through enrollment) and its own mTLS connection to the broker, and speaks the real protocol
of DESIGN.md section 3: the retained ``offline`` presence as its will and ``online`` presence on
connect, director-signature verification of every DesiredState, deployment phase reports with a
device-monotonic ``seq``, and health windows. How a version behaves on a device (download and
install time, failure and revert rates, error rate, latency, shadow agreement) is a
:class:`~server.sim.profiles.Profile`.

One paho ``loop_start()`` thread per client stops working near a thousand clients, so each worker
process multiplexes its clients' sockets on one ``selectors`` selector (paho's external-loop API:
``loop_read``/``loop_write``/``loop_misc`` with the socket open/close and register-write callbacks),
and the fleet is split over several worker processes (:mod:`server.sim.fleet`).

Simulated devices skip the real download (and onnxruntime): they report the phases a real daemon
reports, with the configured timings. Real daemons can run next to them against the same server.
"""

from server.sim.profiles import Profile, parse_profile

__all__ = ["Profile", "parse_profile"]
