"""What a benchmark ran on: machine, CPU, library versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from calibration.artifact import library_versions


def machine_info() -> dict:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "versions": library_versions()}
