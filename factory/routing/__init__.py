"""Request routing between a model's replicas: the Ray Serve router and the stats replicas publish.

The routing policy itself is pure and lives in factory/policy/routing.py.
"""
