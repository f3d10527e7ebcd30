"""What the engine routers of this process know, by (app, deployment): live replica ids and decisions.

The router (integrations/serve_router.py) runs in the process that holds the deployment handle, on Ray
Serve's router thread; the ingress reads this state for /metrics. It lives in its own module because
Ray Serve ships the router class to that process with cloudpickle, which can copy the class's methods
with a private globals dict: module-level state beside the class would then not be the state the
ingress reads, while an imported module is always shared. Tuples and Counter increments are safe to
read across threads.
"""

from __future__ import annotations

from collections import Counter

LIVE_REPLICAS: dict[tuple[str, str], tuple[str, ...]] = {}
DECISIONS: dict[tuple[str, str], Counter] = {}


def live_replicas(app_name: str, deployment_name: str) -> tuple[str, ...]:
    """Replica ids (ReplicaID.unique_id) the routers in this process currently route to; () before the
    deployment's handle has routed anything."""
    return LIVE_REPLICAS.get((app_name, deployment_name), ())


def routing_decisions(app_name: str, deployment_name: str) -> dict[str, int]:
    """Counts of routing decisions in this process: affinity, fallback_imbalanced, power_of_two, targeted,
    moved (a request sent again by queue rebalancing, to the replica it was released to)."""
    return dict(DECISIONS.get((app_name, deployment_name), {}))
