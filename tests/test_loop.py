"""The training loop on its own: a host that is no trainer shows what the loop does and when,
through the interface it declares (no model, no optimizer, no data)."""
from __future__ import annotations

import pytest
import torch

from selfalign.training.distributed import DistInfo
from selfalign.training.loop import LoopHost, Schedule, crossed, run_loop

BATCH = 10
# every 2 steps a log record, every 3 a sample grid, every 5 an evaluation, every 4 a checkpoint
SCHEDULE = Schedule(BATCH, total_steps=7, log_every_kimg=0.02, sample_every_kimg=0.03,
                    eval_every_kimg=0.05, ckpt_every_kimg=0.04)


class Host:
    """Loss ``step + 1`` at each step; steps in ``bad`` are skipped; a stop arrives at ``stop_at``."""

    def __init__(self, start: int = 0, bad=(), stop_at: int | None = None):
        self.info, self.step, self.bad, self.stop_at = DistInfo(), start, set(bad), stop_at
        self.events: list[tuple[str, int]] = []
        self.messages: list[str] = []

    def batches(self):
        while True:
            yield torch.zeros(2), torch.zeros(2)

    def train_step(self, x, y, images=None):
        ok = self.step not in self.bad
        loss = torch.tensor(float(self.step + 1))
        self.step += 1
        return ok, {"loss": loss, "gen": loss / 2}

    def stop_requested(self) -> bool:
        return self.stop_at is not None and self.step >= self.stop_at

    def save(self):
        self.events.append(("save", self.step))

    def write_samples(self, metrics):
        self.events.append(("samples", self.step))

    def evaluate(self):
        self.events.append(("eval", self.step))
        return {"fd": float(self.step)}

    def log_fields(self, images: int) -> dict:
        return {"lr": 0.5, "images_seen_by_host": images}

    def log(self, message: str) -> None:
        self.messages.append(message)


class Metrics:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def of(host, kind):
    return [step for name, step in host.events if name == kind]


def test_the_schedule_logs_samples_evaluates_and_saves_at_its_crossings():
    host, metrics = Host(bad={2}), Metrics()
    run_loop(host, SCHEDULE, metrics)
    assert host.step == 7
    assert of(host, "samples") == [3, 6, 7] and of(host, "eval") == [5, 7] and of(host, "save") == [4, 7]
    train = [r for r in metrics.records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 7]                    # the last step always logs
    assert [r["loss"] for r in train] == [1.5, 4.0, 5.5, 7.0]            # step 2 (loss 3) was skipped
    assert [r["skipped_in_window"] for r in train] == [0, 1, 0, 0]
    assert [r["loss/gen"] for r in train] == [0.75, 2.0, 2.75, 3.5]
    assert all(r["lr"] == 0.5 and r["images_seen_by_host"] == r["images"] == r["step"] * BATCH for r in train)
    assert [(r["step"], r["fd"]) for r in metrics.records if r["kind"] == "eval"] == [(5, 5.0), (7, 7.0)]
    assert len(host.messages) == 4 and host.messages[-1].startswith("step 7/7 (0.07 kimg) loss 7.0000")


def test_a_resumed_loop_keeps_the_crossings_of_the_whole_run():
    host, metrics = Host(start=3), Metrics()
    run_loop(host, SCHEDULE, metrics)
    assert [r["step"] for r in metrics.records if r["kind"] == "train"] == [4, 6, 7]
    assert of(host, "save") == [4, 7] and of(host, "samples") == [6, 7]


def test_a_stop_request_ends_the_loop_after_a_checkpoint_of_that_step():
    host = Host(stop_at=3)
    run_loop(host, SCHEDULE, None)
    assert host.step == 3 and of(host, "save") == [3]
    assert host.messages == ["stop requested: checkpoint written at step 3"]    # no metrics: no log lines


@pytest.mark.parametrize("before, after, every, expected", [
    (0, 10, 0.01, True), (10, 19, 0.01, False), (19, 20, 0.01, True), (0, 100, 0, False), (5, 6, 0.0001, True)])
def test_crossed(before, after, every, expected):
    assert crossed(before, after, every) is expected


def test_the_trainer_provides_every_method_the_loop_declares():
    from selfalign.training.trainer import Trainer
    methods = [name for name, value in vars(LoopHost).items() if callable(value) and not name.startswith("_")]
    assert len(methods) == 8
    for name in methods:
        assert callable(getattr(Trainer, name, None)), name
