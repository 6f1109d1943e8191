"""GPU probes: one model shape's decode and prefill step time, power and energy per token.

Imports only the stdlib, torch and (lazily, for GPU runs) pynvml, so that the lent GPU machines,
which have no vLLM, Ray or `factory`, can run it with the repository root on `sys.path`.
"""
