"""Training slots: at most N holders at once across processes; a killed holder frees its slot."""

import multiprocessing
import os
import signal
import time

from worker.training_slots import TrainingSlots


def test_no_cap_always_grants():
    with TrainingSlots("/nonexistent-never-created", 0).hold() as granted:
        assert granted


def test_two_slots_admit_two_holders_and_a_third_waits_or_gives_up(tmp_path):
    slots = TrainingSlots(tmp_path, 2)
    with slots.hold() as first, TrainingSlots(tmp_path, 2).hold() as second:
        assert first and second
        with TrainingSlots(tmp_path, 2).hold(give_up=lambda: True) as third:
            assert third is False
    with TrainingSlots(tmp_path, 2).hold(give_up=lambda: True) as again:
        assert again  # both were released


def _hold_forever(directory, ready):
    with TrainingSlots(directory, 1).hold():
        ready.set()
        time.sleep(600)


def test_a_slot_held_by_a_killed_process_is_released(tmp_path):
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=_hold_forever, args=(str(tmp_path), ready))
    holder.start()
    assert ready.wait(30)
    with TrainingSlots(tmp_path, 1).hold(give_up=lambda: True) as taken:
        assert taken is False
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    with TrainingSlots(tmp_path, 1).hold(give_up=lambda: True) as free:
        assert free
