"""Token factory: an energy-aware inference runtime (vLLM replicas on Ray Serve)."""
