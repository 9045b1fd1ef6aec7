"""Console progress: the ETA a stage prints."""

from __future__ import annotations


def test_eta_from_the_pace_of_this_process():
    """Catches an ETA from the whole run's count after a resume (it would credit the killed run's steps)."""
    from pipeline.core.progress import eta

    assert eta(10.0, 0, 5) == ""  # nothing done yet: no pace
    assert eta(10.0, 1, 5) == "ETA 40s"
    assert eta(100.0, 1, 5) == "ETA 6m40s"
    assert eta(4000.0, 1, 3) == "ETA 2h13m"
    assert eta(5.0, 5, 5) == "ETA 0s"
