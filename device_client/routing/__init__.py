"""Hybrid edge/cloud routing: the edge model answers at once, unsure cases go to a cloud model
speaking the Open Inference Protocol, cached cloud answers cover for an unreachable cloud.

One job a file: confidence (reading and agreement), budget (token bucket), breaker, cache (on
disk), oip (the cloud client), router (the modes), stats (health-window counters), background
(bounded work off the caller's path) and factory (a router from a policy and the device).
"""
