"""Runs that cannot mean anything are refused before training (issue 12 item 7): a training batch larger than
the training set, and an image smaller than a model's total downsampling."""
import pytest

from fisherbench.core.errors import UserError
from fisherbench.data.registry import build_data
from fisherbench.models import create_model

SMALL = ["model.width=4", "model.hidden=16", "optimizer=adam", "logger=none"]


def test_batch_larger_than_the_training_set_is_refused_with_the_numbers():
    with pytest.raises(UserError, match=r"data.batch_size=2000 is larger than the 1438 training examples of "
                                         r"'digits'.*at most 1438"):
        build_data({"name": "digits", "batch_size": 2000})
    # after the stratified val hold-out
    with pytest.raises(UserError, match="larger than the 1295 training examples"):
        build_data({"name": "digits", "batch_size": 1400, "val_fraction": 0.1})
    assert build_data({"name": "digits", "batch_size": 1438}).num_train == 1438  # the whole set is allowed
    assert build_data({"name": "digits", "batch_size": 4, "eval_batch_size": 100_000}).num_train == 1438


def test_batch_larger_than_the_training_set_is_a_configuration_error(run_train):
    with pytest.raises(UserError, match="data.batch_size=100 is larger than the 64 training examples"):
        run_train("data.batch_size=100", "budget=steps", "budget.steps=1")


@pytest.mark.parametrize("name,shape,minimum", [
    ("resnet50", (3, 8, 8), 32), ("resnet50", (1, 28, 28), 32), ("resnet18_cifar", (3, 4, 4), 8),
    ("mobilenetv3", (3, 4, 4), 8), ("mobilenetv3_official", (3, 28, 28), 32),
])
def test_images_smaller_than_the_models_downsampling_are_refused(name, shape, minimum):
    with pytest.raises(UserError, match=fr"'{name}' needs images of at least {minimum}x{minimum}.*got "
                                         fr"{shape[1]}x{shape[2]}"):
        create_model(name, num_classes=10, input_shape=shape)


@pytest.mark.parametrize("name,shape", [("resnet50", (3, 32, 32)), ("resnet18_cifar", (1, 8, 8)),
                                        ("mobilenetv3_official", (3, 32, 32)), ("mobilenetv3", (3, 8, 8))])
def test_the_minimum_size_itself_is_accepted(name, shape):
    import torch

    with torch.device("meta"):
        create_model(name, num_classes=10, input_shape=shape)


def test_resnet50_on_8x8_digits_is_refused_before_training(run_train):
    with pytest.raises(UserError, match=r"model 'resnet50'.*at least 32x32.*got 8x8"):
        run_train("model=resnet50", "data=digits", "budget=steps", "budget.steps=1",
                  base=["optimizer=adam", "logger=none"])
