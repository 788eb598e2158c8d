"""Hybrid edge/cloud routing: the edge model answers at once, unsure cases go to a cloud model
speaking the Open Inference Protocol, cached cloud answers cover for an unreachable cloud.

One job a file: router (the modes), call (what is sent and comes back, the deadline), oip (the
cloud client), confidence (reading and agreement), budget (token bucket), breaker, cache (on
disk), stats (health-window counters), background (bounded work off the caller's path) and
factory (a router from a policy and the device).
"""

from .factory import CloudConfigError, RoutingEnvironment, build_cloud_client, build_router, host_edge
from .oip import CloudAnswer, CloudFailure, OipClient
from .router import Answer, EdgeFn, Router
from .stats import RoutingStats

__all__ = [
    "Answer",
    "CloudAnswer",
    "CloudConfigError",
    "CloudFailure",
    "EdgeFn",
    "OipClient",
    "Router",
    "RoutingEnvironment",
    "RoutingStats",
    "build_cloud_client",
    "build_router",
    "host_edge",
]
