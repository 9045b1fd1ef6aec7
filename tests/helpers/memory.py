"""The CPU allocator's peak while a function runs, as torch's profiler reports every allocation and free."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path


def allocator_peak(fn: Callable[[], object]) -> int:
    """Bytes: the highest total the CPU allocator held while ``fn`` ran, above what it held when ``fn`` started
    (the profiler's ``[memory]`` events, each with the allocator's running total)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - start
