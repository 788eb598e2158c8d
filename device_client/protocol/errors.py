"""Exception family of the wire contract.

Everything that rejects bytes from the other side raises a subclass of :class:`ProtocolError`,
so a transport can catch one family, count the rejection and carry on.
"""


class ProtocolError(Exception):
    """Base class: bytes from the other side were not acceptable."""

    #: a short, stable machine-readable reason (used in reports and counters)
    code: str = "protocol_error"


class InvalidPayload(ProtocolError):
    """A payload is not JSON, has the wrong schema, or fails validation."""

    code = "invalid_payload"


class InvalidTopic(ProtocolError):
    """A topic is not one of ``fleet/v1/d/{device_id}/{kind}``."""

    code = "invalid_topic"


class SignatureError(ProtocolError):
    """A signature is missing, malformed, made by an unknown key, or does not verify."""

    code = "bad_signature"


class BundleError(ProtocolError):
    """A bundle tar is malformed, unsafe (traversal, links, devices), or over its caps."""

    code = "bad_bundle"
