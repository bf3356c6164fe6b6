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


@pytest.mark.parametrize("epochs,decay", [(10, 9.0), (2, 1.0), (1, 1.0)])
def test_default_schedule_falls_tenfold_by_the_last_epoch(epochs, decay):
    c = TrainConfig(lr=0.05, epochs=epochs).validate()
    assert c.lr_decay_epochs is None and c.decay_epochs == decay
    assert lr_at(c, 0) == pytest.approx(0.05)
    if epochs > 1:
        assert lr_at(c, epochs - 1) == pytest.approx(0.005)
    with pytest.raises(BnprobeError, match="lr-decay-epochs"):
        TrainConfig(lr_decay_epochs=0.0).validate()
