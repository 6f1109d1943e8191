"""Power telemetry: where a replica's joules come from.

`sources.PowerSource` is the interface (NVML on GPUs, a busy-fraction model elsewhere; every
reading says which), `sampler.PowerSampler` polls one on a thread. Only `nvml.py` touches
`pynvml`, and only when an NVML source is opened.
"""
