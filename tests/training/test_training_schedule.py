import math

import pytest

from bnprobe.errors import BnprobeError
from bnprobe.training import TrainConfig, lr_at


def test_lr_falls_tenfold_every_decay_period():
    c = TrainConfig(lr=0.1, lr_decay_epochs=600)
    assert lr_at(c, 0) == pytest.approx(0.1)
    assert lr_at(c, 600) == pytest.approx(0.01)
    assert lr_at(c, 1200) == pytest.approx(0.001)
    gamma = 0.1 ** (1 / 600)
    assert lr_at(c, 7) == pytest.approx(0.1 * gamma**7)
    assert math.isclose(lr_at(c, 8) / lr_at(c, 7), gamma)


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 1, "batch-size"), ("epochs", 0, "epochs"), ("lr", -1.0, "lr"),
    ("norm", "xx", "'xx'"), ("dataset", "mnist", "'mnist'"), ("optimizer", "rmsprop", "rmsprop"),
])
def test_bad_options_are_named(field, value, message):
    with pytest.raises(BnprobeError, match=message):
        TrainConfig(**{field: value}).validate()
