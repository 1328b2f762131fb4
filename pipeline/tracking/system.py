"""System metrics (tracking.system_metrics): CPU, memory, disk, network and, with nvidia-ml-py and a
GPU, each GPU's memory, utilisation and power, sampled every `interval` seconds with psutil / pynvml.
The names are those MLflow's own system metrics use, under `system/`. The values go through the
tracker's never-blocking path at the latest training step (`record(values, step)`)."""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import psutil

logger = logging.getLogger("pipeline.tracking")


def _gpu_handles() -> tuple[object, list]:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception as exc:  # noqa: BLE001 - no library, no driver, no GPU: no GPU metrics
        logger.info("system metrics: no GPU metrics (%s)", exc)
        return None, []


def sample(net_start: tuple[float, float], nvml=None, gpus: list | None = None) -> dict[str, float]:
    """One sample; `net_start`: (received, sent) megabytes when sampling began."""
    memory, disk, net = psutil.virtual_memory(), psutil.disk_usage(os.sep), psutil.net_io_counters()
    values = {
        "cpu_utilization_percentage": psutil.cpu_percent(),
        "system_memory_usage_megabytes": memory.used / 1e6,
        "system_memory_usage_percentage": memory.used / memory.total * 100,
        "disk_usage_percentage": disk.percent,
        "disk_usage_megabytes": disk.used / 1e6,
        "disk_available_megabytes": disk.free / 1e6,
        "network_receive_megabytes": net.bytes_recv / 1e6 - net_start[0],
        "network_transmit_megabytes": net.bytes_sent / 1e6 - net_start[1],
    }
    for i, handle in enumerate(gpus or []):
        try:
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            values[f"gpu_{i}_memory_usage_percentage"] = mem.used / mem.total * 100
            values[f"gpu_{i}_memory_usage_megabytes"] = mem.used / 1e6
            values[f"gpu_{i}_utilization_percentage"] = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            power = nvml.nvmlDeviceGetPowerUsage(handle)
            values[f"gpu_{i}_power_usage_watts"] = power / 1000
            values[f"gpu_{i}_power_usage_percentage"] = power / nvml.nvmlDeviceGetEnforcedPowerLimit(handle) * 100
        except Exception as exc:  # noqa: BLE001 - one GPU query failing must not stop the sampler
            logger.debug("system metrics: GPU %d: %s", i, exc)
    return {k: round(float(v), 1) for k, v in values.items()}


class SystemSampler:
    """A daemon thread calling `record({"system/...": value}, step())` every `interval` seconds."""

    def __init__(self, record: Callable[[dict[str, float], int], None], step: Callable[[], int],
                 interval: float):
        self.nvml, self.gpus = _gpu_handles()
        net = psutil.net_io_counters()
        self.net_start = (net.bytes_recv / 1e6, net.bytes_sent / 1e6)
        psutil.cpu_percent()   # the first call only starts psutil's CPU interval
        self.record, self.step, self.interval = record, step, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            values = sample(self.net_start, self.nvml, self.gpus)
            self.record({f"system/{k}": v for k, v in values.items()}, self.step())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
