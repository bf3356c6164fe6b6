"""Method labels of the report follow the run's configuration."""

import pytest

from bnprobe.evaluation.labels import evaluation_label, method_label


@pytest.mark.parametrize("config,mc_mode,label", [
    ({"norm": "bn"}, "mcbn", "BN (MC: MCBN)"),
    ({"norm": "bn"}, "parametric-bn", "BN (MC: parametric)"),
    ({"norm": "wn", "noise": "fitted.json", "learn_noise": "off"}, None, "WN + fitted noise"),
    # with learned noise the noise file only initializes sigma_S: no fixed noise is injected
    ({"norm": "an", "noise": "fitted.json", "learn_noise": "channel"}, None, "AN + learned noise (channel)"),
    ({"norm": "wn", "learn_noise": "layer"}, None, "WN + learned noise (layer)"),
    ({"norm": "an"}, None, "AN"),
])
def test_method_label(config, mc_mode, label):
    assert method_label(config, mc_mode) == label


def test_evaluation_label_rebuilds_from_the_recorded_config():
    doc = {"label": "stale", "source": {"config": {"norm": "bn"}}, "metrics": {"mc_mode": "mcbn"}}
    assert evaluation_label(doc) == "BN (MC: MCBN)"
    assert evaluation_label(doc, with_mc=False) == "BN"
    assert evaluation_label({"label": "foreign"}) == "foreign"


def test_population_buffers_are_labelled():
    from bnprobe.evaluation.labels import evaluation_label

    doc = {"source": {"config": {"norm": "bn"}, "bn_buffers": "population statistics (precise BN)"},
           "metrics": {"mc_mode": "mcbn"}}
    assert evaluation_label(doc) == "BN, population buffers (MC: MCBN)"
    doc["source"]["bn_buffers"] = "running averages from training"
    assert evaluation_label(doc) == "BN (MC: MCBN)"
