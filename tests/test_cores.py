"""CPU stages on one machine take turns on its cores a step at a time (``stages.cores``)."""

from __future__ import annotations

import asyncio
import threading
import time

from parallax.stages import cores
from parallax.stages.compute import ComputeThread
from parallax.stages.cores import SharedCores


def test_stages_whose_threads_fill_the_machine_take_turns(tmp_path, monkeypatch):
    monkeypatch.setattr(cores, "cpu_count", lambda: 2)
    a, b = SharedCores(2, tmp_path), SharedCores(2, tmp_path)  # 2 threads each on 2 cores
    assert a.acquire() is False  # free: no wait
    got: list[tuple[bool, float]] = []
    waiter = threading.Thread(target=lambda: got.append((b.acquire(), time.monotonic())))
    waiter.start()
    time.sleep(0.3)
    assert not got  # b waits while a steps
    released = time.monotonic()
    a.release()
    waiter.join(5)
    assert got and got[0][0] is True and got[0][1] >= released  # it waited, and got the cores once a let go
    b.release()
    assert a.acquire() is False
    a.release()


def test_stages_of_fewer_threads_step_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setattr(cores, "cpu_count", lambda: 4)
    stages = [SharedCores(2, tmp_path) for _ in range(3)]  # 4 cores, 2 threads each: two at a time
    assert [s.acquire() for s in stages[:2]] == [False, False]
    third = threading.Thread(target=stages[2].acquire)
    third.start()
    time.sleep(0.2)
    assert third.is_alive()  # a third stage waits for one of the two
    stages[0].release()
    third.join(5)
    assert not third.is_alive()
    for s in stages[1:]:
        s.release()


def test_stages_of_other_thread_counts_share_the_same_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(cores, "cpu_count", lambda: 2)
    one, two = SharedCores(1, tmp_path), SharedCores(2, tmp_path)
    assert one.acquire() is False
    waiter = threading.Thread(target=two.acquire)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()  # 2 threads: not while a 1-thread stage holds one of the 2 cores
    one.release()
    waiter.join(5)
    assert not waiter.is_alive()
    two.release()


def test_a_step_holds_the_cores_and_lets_go_after(tmp_path, monkeypatch):
    monkeypatch.setattr(cores, "cpu_count", lambda: 1)
    compute, other = ComputeThread(SharedCores(1, tmp_path)), SharedCores(1, tmp_path)

    def step() -> str:
        holder = threading.Thread(target=other.acquire)  # another stage: must wait while this step runs
        holder.start()
        holder.join(0.3)
        return "busy" if holder.is_alive() else "free"

    assert asyncio.run(compute.step(step)) == "busy"
    time.sleep(0.1)
    other.release()  # the other stage got the core once the step ended
    compute.close()
