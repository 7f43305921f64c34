"""The training loop waits for the device only every few steps: the loss is summed and checked
for NaN or inf on the device, which changes no result and still catches a diverged run."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_cnn, make_tiny_data
from torch import nn

from biotune import training
from biotune.training import TrainConfig, TrainHooks, fine_tune


class _NanAtStep(TrainHooks):
    """A penalty that turns the loss of step ``bad`` (counted from 1 over the run) into NaN."""

    def __init__(self, bad: int) -> None:
        self.bad, self.steps = bad, 0

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        self.steps += 1
        return torch.tensor(float("nan")) if self.steps == self.bad else None


def _train(every: int, hooks: TrainHooks | None, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(training, "finite_check_steps", lambda device: every)
    torch.manual_seed(0)
    model = make_tiny_cnn()
    data = make_tiny_data(48)
    config = TrainConfig(epochs=3, patience=3, batch_size=8, eval_batch_size=16)
    groups = [{"params": list(model.parameters())}]
    result = fine_tune(model, groups, data, make_tiny_data(24, seed=1), config, 0, None, hooks)
    return result, copy.deepcopy(model.state_dict())


def test_checking_finiteness_every_few_steps_changes_no_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    every_step, every_step_state = _train(1, None, monkeypatch)
    every_four, every_four_state = _train(4, None, monkeypatch)
    assert every_step.status == every_four.status == "ok"
    assert every_step.history == every_four.history and len(every_step.history) == 3
    assert all(torch.equal(every_step_state[k], every_four_state[k]) for k in every_step_state)


@pytest.mark.parametrize(("every", "steps_taken"), [(1, 1), (4, 3)])
def test_a_nan_loss_ends_the_run_as_diverged_at_the_next_check(
    monkeypatch: pytest.MonkeyPatch, every: int, steps_taken: int
) -> None:
    result, _ = _train(every, _NanAtStep(2), monkeypatch)
    assert result.status == "diverged" and result.val.balanced == 0.0
    assert result.train_images == 8 * steps_taken  # the CPU (every step) stops before step 2


def test_a_nan_in_the_last_steps_of_an_epoch_is_caught_at_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result, _ = _train(100, _NanAtStep(5), monkeypatch)  # 6 steps per epoch, none checked
    assert result.status == "diverged" and result.history == []
    assert result.train_images == 48


def test_the_cpu_checks_every_step() -> None:
    assert training.finite_check_steps(torch.device("cpu")) == 1
    assert training.finite_check_steps(torch.device("cuda")) == training.FINITE_CHECK_STEPS > 1
