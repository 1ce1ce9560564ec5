"""launch()'s sizing defaults: automatic sizing unless the shape is fixed, the gate with it."""
import pytest

from dovetail.runtime.config import CoordinatorConfig
from dovetail.runtime.launch import settle_sizing

pytestmark = pytest.mark.timeout(30)


def test_automatic_sizing_and_its_gate_are_the_default():
    c = settle_sizing(CoordinatorConfig())
    assert c.auto_tree is True and c.gate is True


def test_a_fixed_shape_is_kept_as_given_without_a_gate():
    for fixed in (dict(depth=4), dict(max_nodes=8)):
        c = settle_sizing(CoordinatorConfig(**fixed))
        assert c.auto_tree is False and c.gate is False


def test_the_gate_can_be_turned_off_and_caps_keep_it():
    assert settle_sizing(CoordinatorConfig(gate=False)).gate is False
    c = settle_sizing(CoordinatorConfig(depth=4, auto_tree=True))
    assert c.auto_tree is True and c.gate is True


def test_a_gate_without_automatic_sizing_is_refused():
    with pytest.raises(ValueError, match="needs auto_tree"):
        settle_sizing(CoordinatorConfig(depth=4, gate=True))
