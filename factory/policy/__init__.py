"""Policies: pure decision code (no Ray, vLLM or torch) shared by the engine, router, governor and simulator."""
