"""The cost model: path costs checked against arithmetic done by hand, validation, config merging."""

import json

import numpy as np
import pytest
from pydantic import ValidationError

from dimee_models.cost import PATHS, CostModel, load_cost_model


def test_default_path_costs_m2_e4_l6():
    # defaults: lambda_mobile = lambda_edge = lambda_cloud = 0.1, o_1 = 0.2, o_2 = 0.5, o_edge_cloud = 0.3
    expected = {
        "mobile": 0.1 * 2,  # 0.2
        "edge": 0.1 * 2 + 0.2 + 0.1 * (4 - 2),  # 0.2 + 0.2 + 0.2 = 0.6
        "cloud": 0.1 * 2 + 0.5 + 0.1 * (6 - 2),  # 0.2 + 0.5 + 0.4 = 1.1
        "edge_cloud": 0.6 + 0.3 + 0.1 * (6 - 4),  # 0.6 + 0.3 + 0.2 = 1.1
        "cloud_only": 0.5 + 0.1 * 6,  # 0.5 + 0.6 = 1.1
    }
    got = CostModel().path_costs(2, 4, 6)
    assert set(got) == set(PATHS)
    assert got == pytest.approx(expected)
    assert got == pytest.approx({"mobile": 0.2, "edge": 0.6, "cloud": 1.1, "edge_cloud": 1.1, "cloud_only": 1.1})


def test_non_default_path_costs_m3_e8_l12():
    cost = CostModel(lambda_mobile=0.3, lambda_edge=0.2, lambda_cloud=0.05, o_1=0.1, o_2=0.4, o_edge_cloud=0.25)
    expected = {
        "mobile": 0.9,  # 0.3 * 3
        "edge": 2.0,  # 0.9 + 0.1 + 0.2 * (8 - 3) = 0.9 + 0.1 + 1.0
        "cloud": 1.75,  # 0.9 + 0.4 + 0.05 * (12 - 3) = 0.9 + 0.4 + 0.45
        "edge_cloud": 2.45,  # 2.0 + 0.25 + 0.05 * (12 - 8) = 2.0 + 0.25 + 0.2
        "cloud_only": 1.0,  # 0.4 + 0.05 * 12 = 0.4 + 0.6
    }
    assert cost.path_costs(3, 8, 12) == pytest.approx(expected)
    assert cost.mu == 1.0  # unset fields keep their defaults


def test_costs_of_maps_path_indices_to_per_sample_costs():
    paths = np.array([0, 4, 1, 1, 2, 3, 0])  # mobile, cloud_only, edge, edge, cloud, edge_cloud, mobile
    got = CostModel().costs_of(paths, 2, 4, 6)
    assert got.shape == (7,)
    np.testing.assert_allclose(got, [0.2, 1.1, 0.6, 0.6, 1.1, 1.1, 0.2])
    cost = CostModel(lambda_mobile=0.3, lambda_edge=0.2, lambda_cloud=0.05, o_1=0.1, o_2=0.4, o_edge_cloud=0.25)
    np.testing.assert_allclose(cost.costs_of(np.array([3, 2, 1, 0, 4]), 3, 8, 12), [2.45, 1.75, 2.0, 0.9, 1.0])
    assert cost.costs_of(np.array([], dtype=int), 3, 8, 12).shape == (0,)


@pytest.mark.parametrize("field", ["lambda_mobile", "lambda_edge", "lambda_cloud", "o_1", "o_2", "o_edge_cloud", "mu"])
def test_negative_values_rejected(field):
    with pytest.raises(ValidationError, match=field):
        CostModel(**{field: -0.01})
    assert getattr(CostModel(**{field: 0.0}), field) == 0.0  # zero is allowed


def test_unknown_fields_rejected_and_model_is_frozen():
    with pytest.raises(ValidationError, match="lambda_fog"):
        CostModel(lambda_fog=1.0)
    with pytest.raises(ValidationError):
        CostModel().mu = 2.0


def test_load_cost_model_merges_defaults_file_overrides(tmp_path):
    assert load_cost_model(None) == CostModel()
    config = tmp_path / "cost.json"
    config.write_text(json.dumps({"o_2": 0.9, "mu": 0.5, "lambda_edge": 0.2}))
    got = load_cost_model(config, mu=0.25, o_1=None, lambda_cloud=0.3)
    # file beats defaults, non-None overrides beat the file, None overrides are ignored
    assert got == CostModel(o_2=0.9, lambda_edge=0.2, mu=0.25, lambda_cloud=0.3)
    assert got.o_1 == 0.2 and got.lambda_mobile == 0.1
    assert load_cost_model(str(config)).mu == 0.5  # a str path works too
    config.write_text(json.dumps({"o_3": 1.0}))
    with pytest.raises(ValidationError, match="o_3"):
        load_cost_model(config)
    with pytest.raises(ValidationError, match="mu"):
        load_cost_model(None, mu=-1.0)
