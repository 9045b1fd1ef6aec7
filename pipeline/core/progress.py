"""Console progress: how long the rest of a stage will take, from the pace so far."""

from __future__ import annotations


def eta(elapsed: float, done: int, total: int) -> str:
    """``"ETA 3m05s"`` for ``total - done`` more units at the pace of ``done`` units in ``elapsed`` seconds (units
    counted since this process started, so a resumed stage is not credited with the killed run's work); ``""``
    before the first unit."""
    if done <= 0 or total <= done:
        return "" if done <= 0 else "ETA 0s"
    seconds = round(elapsed / done * (total - done))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"ETA {hours}h{minutes:02d}m"
    return f"ETA {minutes}m{secs:02d}s" if minutes else f"ETA {secs}s"
