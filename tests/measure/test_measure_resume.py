"""An interrupted measurement resumes to exactly the result of an uninterrupted one."""

import pandas as pd
import pytest
import torch

from bnprobe.errors import BnprobeError
from bnprobe.measure import measure
from bnprobe.measure.recorder import Recorder
from bnprobe.models import AllCNN


def _model():
    return AllCNN(num_classes=3, width=0.1)


def _data():
    return torch.randn(60, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def _run(model, resume_dir=None, seed=0, **kw):
    return measure(model, _data(), [4, 8, 16], samples=5, spatial_fractions=[0.5],
                   generator=torch.Generator().manual_seed(seed), resume_dir=resume_dir, **kw)


class _Interrupt(Exception):
    pass


def test_interrupted_measurement_resumes_identically(tmp_path, monkeypatch):
    model = _model()
    full = _run(model)
    original = Recorder.run
    calls = {"n": 0}

    def failing(self, m, x):
        calls["n"] += 1
        if calls["n"] == 8:  # inside the second batch size
            raise _Interrupt
        return original(self, m, x)

    monkeypatch.setattr(Recorder, "run", failing)
    with pytest.raises(_Interrupt):
        _run(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k4.parquet", "reference.pt", "state.pt"]
    redone = {"n": 0}

    def counting(self, m, x):
        redone["n"] += 1
        return original(self, m, x)

    monkeypatch.setattr(Recorder, "run", counting)
    resumed = _run(model, tmp_path)
    assert redone["n"] == 10  # k=8 again from its start, then k=16; k=4 is not redone
    pd.testing.assert_frame_equal(resumed.samples, full.samples)
    pd.testing.assert_frame_equal(resumed.reference, full.reference)
    pd.testing.assert_frame_equal(resumed.layers, full.layers)


def test_resume_skips_finished_batch_sizes(tmp_path, monkeypatch):
    model = _model()
    _run(model, tmp_path)
    calls = {"n": 0}
    original = Recorder.run

    def counting(self, m, x):
        calls["n"] += 1
        return original(self, m, x)

    monkeypatch.setattr(Recorder, "run", counting)
    _run(model, tmp_path)
    assert calls["n"] == 0


@pytest.mark.parametrize("change", ["seed", "samples", "weights"])
def test_resume_with_other_settings_is_refused(tmp_path, change):
    model = _model()
    _run(model, tmp_path)
    with pytest.raises(BnprobeError, match="other settings"):
        if change == "seed":
            _run(model, tmp_path, seed=1)
        elif change == "samples":
            measure(model, _data(), [4, 8, 16], samples=6, spatial_fractions=[0.5],
                    generator=torch.Generator().manual_seed(0), resume_dir=tmp_path)
        else:
            with torch.no_grad():
                model.features[0].conv.weight.mul_(1.5)
            _run(model, tmp_path)


def test_interrupted_isolated_measurement_resumes_identically(tmp_path, monkeypatch):
    import bnprobe.measure.core as core

    model = _model()
    full = _run(model, mode="isolated")
    original = core.isolated_vu
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:  # inside the second batch size (9 layers x 2 fractions each)
            raise _Interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(core, "isolated_vu", failing)
    with pytest.raises(_Interrupt):
        _run(model, tmp_path, mode="isolated")
    monkeypatch.setattr(core, "isolated_vu", original)
    resumed = _run(model, tmp_path, mode="isolated")
    pd.testing.assert_frame_equal(full.samples, resumed.samples)
    pd.testing.assert_frame_equal(full.reference, resumed.reference)
