"""The sweeps' timing: a sweep asked for during its own pass runs again at once (not a whole
period later), and passes of one sweep never overlap."""

from __future__ import annotations

import threading
import time

from dicomnode.node.schedule import Sweeps, build_scheduler
from tests.conftest import wait_for


def test_a_request_during_a_pass_runs_the_sweep_again_at_once() -> None:
    """The completion sweep's period is 60 s here: an association that closes while a pass runs
    must still have its series swept within a second, not at the next tick (APScheduler alone
    skips a job brought forward while it runs)."""
    started = threading.Event()
    release = threading.Event()
    passes: list[float] = []

    def sweep() -> None:
        passes.append(time.monotonic())
        started.set()
        release.wait(5)

    sweeps = Sweeps()
    sweeps.add("completion", sweep, 60)
    scheduler = build_scheduler(sweeps)
    scheduler.start()
    try:
        assert started.wait(5)  # the first pass (at start) is running
        sweeps.run_soon("completion")
        release.set()
        wait_for(lambda: len(passes) >= 2, timeout=2, interval=0.02)
        assert passes[1] - passes[0] < 2
    finally:
        sweeps.stop()
        scheduler.shutdown(wait=True)


def test_a_request_between_passes_runs_at_once_and_passes_never_overlap() -> None:
    running = 0
    most = 0
    count = 0
    lock = threading.Lock()

    def sweep() -> None:
        nonlocal running, most, count
        with lock:
            running += 1
            most = max(most, running)
            count += 1
        time.sleep(0.01)
        with lock:
            running -= 1

    sweeps = Sweeps()
    sweeps.add("completion", sweep, 0.02)  # ticks too, racing the requests
    scheduler = build_scheduler(sweeps)
    scheduler.start()
    try:
        wait_for(lambda: count >= 1, timeout=5, interval=0.01)
        threads = [threading.Thread(target=lambda: [sweeps.run_soon("completion")
                                                   for _ in range(50)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sweeps.stop()
        scheduler.shutdown(wait=True)
    assert most == 1

    idle = Sweeps()
    ran = threading.Event()
    idle.add("completion", ran.set, 3600)  # never ticks: not scheduled at all here
    idle.run_soon("completion")
    assert ran.wait(2)
    idle.stop()
    ran.clear()
    idle.run_soon("completion")  # after stop: dropped, not run
    assert not ran.wait(0.3)
