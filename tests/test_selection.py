"""Which trained state ``train_loop`` keeps: lowest dev loss, or highest dev accuracy with a loss tie-break."""

import pytest
import torch
from torch import nn

from promptbank.config import TrainConfig
from promptbank.train import train_loop


def _run(dev_losses, dev_accs, select_on, patience=10, initial_is_candidate=True):
    """Train a one-parameter module for ``len(dev_losses) - 1`` steps, evaluating after each, with scripted dev
    numbers (entry 0 is step 0)."""
    weight = nn.Parameter(torch.zeros(()))
    module = nn.Module()
    module.weight = weight
    losses, accs = iter(dev_losses), iter(dev_accs)
    current = {}

    def eval_loss() -> float:
        current["acc"] = next(accs)
        return next(losses)

    def batch_loss(idx):
        return -weight

    config = TrainConfig(
        max_steps=len(dev_losses) - 1, eval_every=1, patience=patience, progress=False, grad_clip=0, warmup_ratio=0
    )
    groups = [{"params": [weight], "lr": 1.0}]
    res = train_loop(
        nn.Identity(),
        module,
        4,
        batch_loss,
        eval_loss,
        config,
        param_groups=groups,
        fold=dict,
        dev_metrics={"dev_accuracy": lambda: current["acc"]},
        select_on=select_on,
        initial_is_candidate=initial_is_candidate,
    )
    return res


def test_loss_selection_keeps_step_zero_that_accuracy_selection_replaces():
    """The CL-4 Amazon case: a zero head has the lowest dev loss (uniform predictions) and chance accuracy; every
    trained state is more accurate but, confidently wrong on a few of 8 dev examples, has a higher loss."""
    losses = [1.609, 1.9, 1.7, 1.8]
    accs = [0.25, 0.50, 0.625, 0.625]
    by_loss = _run(losses, accs, None)
    assert by_loss.best_step == 0 and by_loss.best_dev_loss == pytest.approx(1.609)
    by_acc = _run(losses, accs, "dev_accuracy")
    assert by_acc.best_step == 2  # 0.625 first reached at step 2; step 3 ties on accuracy with a higher loss
    assert by_acc.best_dev_loss == pytest.approx(1.7)  # the kept state's own dev loss, not the minimum seen
    assert [h["dev_accuracy"] for h in by_acc.history] == accs


def test_accuracy_ties_go_to_the_lower_loss_and_patience_counts_non_improvements():
    losses = [2.0, 1.0, 0.8, 0.9, 0.95, 0.97, 0.5]
    accs = [0.5, 0.7, 0.7, 0.7, 0.6, 0.7, 0.9]
    res = _run(losses, accs, "dev_accuracy", patience=3)
    assert res.best_step == 2  # tie on 0.7 at step 2 with a lower loss than step 1; steps 3-5 are not better
    assert res.stopped_early and res.steps == 5  # step 6 (better) is never reached


def test_select_on_must_name_a_dev_metric():
    with pytest.raises(ValueError, match="select_on"):
        _run([1.0, 0.5], [0.1, 0.2], "dev_f1")


def test_train_config_validates_select_on():
    assert TrainConfig().select_on == "auto"
    with pytest.raises(ValueError, match="select_on"):
        TrainConfig(select_on="f1")


def test_a_starting_state_that_is_not_a_candidate_is_replaced_by_the_first_evaluation():
    losses, accs = [1.0, 1.5, 1.4, 1.6], [0.25, 0.25, 0.25, 0.125]
    assert _run(losses, accs, "dev_accuracy").best_step == 0
    res = _run(losses, accs, "dev_accuracy", initial_is_candidate=False)
    assert res.best_step == 2  # step 1 replaces step 0 unconditionally; step 2 ties on accuracy with a lower loss
    assert _run(losses, accs, None, initial_is_candidate=False).best_step == 2
