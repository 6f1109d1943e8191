"""Prove the NVML power path on a real GPU: facts, then ~20 s of bf16 matmul load sampled every
100 ms. Checks: the energy counter rises; the counter's average power over the window stays within
the enforced limit (+2 %) and no instant sample exceeds 1.25 x the limit (the board enforces its
limit over a time window, so instant samples may pass it: an H100 at its 700 W limit showed
instants up to 779 W while the 10 s average was 696 W); the counter's energy agrees with the
integral of sampled power within 5 %.

    python kernels/nvml_check.py [--seconds 20] [--device 0]

Standalone (stdlib, torch, pynvml only). Reads the card; never changes clocks or limits.
Exit 0: all checks pass; 1: a check failed; 2: no GPU or no NVML here.
"""

import argparse
import statistics
import sys
import threading
import time


def no_gpu(why):
    print(f"nvml_check: no GPU to check: {why}")
    sys.exit(2)


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def optional(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # NVMLError_NotSupported and kin: report, do not fail
        return f"n/a ({e})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="sampled load duration")
    ap.add_argument("--device", type=int, default=0, help="CUDA device index")
    args = ap.parse_args()
    try:
        import torch
    except ImportError as e:
        no_gpu(f"torch not importable: {e}")
    if not torch.cuda.is_available():
        no_gpu("torch.cuda.is_available() is False")
    try:
        import pynvml as nv

        nv.nvmlInit()
    except Exception as e:
        no_gpu(f"NVML init failed: {e}")
    try:
        # CUDA and NVML may number devices differently: match by UUID when torch gives one.
        try:
            h = nv.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(args.device).uuid}")
        except Exception:
            h = nv.nvmlDeviceGetHandleByIndex(args.device)
        return run(torch, nv, h, args)
    finally:
        nv.nvmlShutdown()


def run(torch, nv, h, args):
    limits = optional(nv.nvmlDeviceGetPowerManagementLimitConstraints, h)
    print(
        f"device     : cuda:{args.device} = NVML {nv.nvmlDeviceGetIndex(h)} {text(nv.nvmlDeviceGetName(h))}"
        f" {text(nv.nvmlDeviceGetUUID(h))}"
    )
    print(f"driver     : {text(nv.nvmlSystemGetDriverVersion())}")
    print(
        f"power limit: {optional(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000)} W, "
        f"constraints {[x / 1000 for x in limits] if isinstance(limits, list) else limits} W"
    )
    print(f"MIG mode   : {optional(nv.nvmlDeviceGetMigMode, h)} (current, pending)")
    print(f"SM clock   : {optional(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)} MHz")

    def instant_w():
        v = nv.nvmlDeviceGetFieldValues(h, [nv.NVML_FI_DEV_POWER_INSTANT])[0]
        if v.nvmlReturn != nv.NVML_SUCCESS:
            raise nv.NVMLError(v.nvmlReturn)
        member = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")[v.valueType]
        return getattr(v.value, member) / 1000  # mW

    try:
        instant_w()
        power_w, method = instant_w, "instant field (NVML_FI_DEV_POWER_INSTANT)"
    except Exception as e:
        power_w, method = lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000, f"power usage, 1 s average (field: {e})"
    print(f"power via  : {method}")

    dev = torch.device("cuda", args.device)
    a, b = (torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) for _ in range(2))
    stop = threading.Event()

    def load():  # sustained bf16 matmuls; synchronize often so stop is prompt
        while not stop.is_set():
            for _ in range(8):
                torch.mm(a, b)
            torch.cuda.synchronize(dev)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        time.sleep(2.0)  # let clocks and power settle before the window
        samples, t0 = [], time.monotonic()  # (time_s, counter_mj, power_w)
        for k in range(int(args.seconds / 0.1) + 1):
            time.sleep(max(0.0, t0 + k * 0.1 - time.monotonic()))
            samples.append((time.monotonic(), nv.nvmlDeviceGetTotalEnergyConsumption(h), power_w()))
        changes, last, end = [], None, time.monotonic() + 2.0  # the counter's own update period, polled fast
        while time.monotonic() < end:
            e = nv.nvmlDeviceGetTotalEnergyConsumption(h)
            if e != last:
                changes.append(time.monotonic())
                last = e
    finally:
        stop.set()
        worker.join()

    t, mj, p = zip(*samples, strict=True)
    counter_j = (mj[-1] - mj[0]) / 1000
    trapz_j = sum((p[i] + p[i + 1]) / 2 * (t[i + 1] - t[i]) for i in range(len(t) - 1))
    # The first change only ends a partial period; median over whole ones.
    deltas = [y - x for x, y in zip(changes[1:-1], changes[2:], strict=True)]
    period = statistics.median(deltas) if deltas else float("nan")
    max_w = limits[1] / 1000 if isinstance(limits, list) else optional(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
    max_w = max_w / 1000 if isinstance(max_w, int) else max_w
    limit_w = max_w if isinstance(max_w, float) else float("inf")
    mean_w = counter_j / (t[-1] - t[0])
    print(f"window     : {t[-1] - t[0]:.2f} s, {len(samples)} samples")
    print(f"energy     : counter {counter_j:.1f} J, trapezoid of power {trapz_j:.1f} J")
    print(
        f"power      : mean {statistics.fmean(p):.1f} W (counter: {counter_j / (t[-1] - t[0]):.1f} W), "
        f"min {min(p):.1f}, max {max(p):.1f}"
    )
    print(f"counter    : updates every {period * 1000:.0f} ms (median of {len(deltas)} deltas)")
    checks = {
        "energy counter rose": counter_j > 0,
        f"average power {mean_w:.0f} W within the limit {limit_w:.0f} W (+2 %)": mean_w <= 1.02 * limit_w,
        f"every instant sample in [0, {1.25 * limit_w:.0f}] W": all(0 <= x <= 1.25 * limit_w for x in p),
        "counter vs trapezoid within 5 %": counter_j > 0 and abs(counter_j - trapz_j) / counter_j <= 0.05,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
