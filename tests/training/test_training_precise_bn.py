import torch

from bnprobe.checkpoint import open_checkpoint
from bnprobe.data import make_splits
from bnprobe.data.spec import DataSpec
from bnprobe.data.synthetic import make_synthetic
from bnprobe.measure import find_bn_layers, recalibrate
from bnprobe.training import TrainConfig, train


def _config(**kw):
    return TrainConfig(dataset="synthetic", width=0.25, epochs=2, device="cpu", mc_every=0, **kw)


def test_precise_bn_checkpoint_holds_population_statistics(tmp_path):
    result = train(_config(), tmp_path / "on")
    ckpt = open_checkpoint(tmp_path / "on")
    assert ckpt.config["precise_bn"] is True
    assert ckpt.payload["precise_bn"]["buffers"] == "population"
    assert all(row["precise_bn_images"] > 0 for row in result.history)
    assert "precise_bn_images" in (tmp_path / "on" / "metrics.csv").read_text().splitlines()[0]
    # Recalibrating the saved model again over the same subset changes nothing.
    model = ckpt.model
    before = [m.running_mean.clone() for _, m in find_bn_layers(model)]
    data = make_synthetic()
    splits = make_splits(data, DataSpec.from_data(data, translate=2), torch.device("cpu"), None,
                         torch.Generator().manual_seed(2))
    recalibrate(model, splits.train, size=10000, augment=True, generator=torch.Generator().manual_seed(7))
    for b, (_, m) in zip(before, find_bn_layers(model)):
        torch.testing.assert_close(m.running_mean, b, rtol=1e-5, atol=1e-6)


def test_no_precise_bn_keeps_running_buffers_and_the_same_weights(tmp_path):
    on = train(_config(), tmp_path / "on").model
    off = train(_config(precise_bn=False), tmp_path / "off").model
    assert "precise_bn" not in open_checkpoint(tmp_path / "off").payload
    for (n, p), (_, q) in zip(on.named_parameters(), off.named_parameters()):
        assert torch.equal(p, q), n  # recalibration never changes the training trajectory
    assert not all(torch.equal(a.running_mean, b.running_mean)
                   for (_, a), (_, b) in zip(find_bn_layers(on), find_bn_layers(off)))
