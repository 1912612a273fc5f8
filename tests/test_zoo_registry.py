"""The zoo registry: registration, lookup, suggestions for unknown names."""

import pytest

from keras_moe.zoo import registry


def test_register_list_get_and_suggest(monkeypatch):
    monkeypatch.setattr(registry, "_BUILDERS", {})

    @registry.register_model
    def tiny_moe(*, num_classes=3, input_shape=(4,)):
        """A tiny model for this test.

        More text.
        """
        return ("built", num_classes, input_shape)

    assert registry.list_models() == ["tiny_moe"]
    assert registry.list_models("moe") == ["tiny_moe"] and registry.list_models("x") == []
    assert registry.describe("tiny_moe") == "A tiny model for this test."
    assert registry.get_model("tiny_moe", num_classes=5) == ("built", 5, (4,))
    with pytest.raises(ValueError, match="Did you mean 'tiny_moe'"):
        registry.get_model("tiny_mo")
    with pytest.raises(ValueError, match="already registered"):
        def other():
            pass
        other.__name__ = "tiny_moe"
        registry.register_model(other)


def test_every_registered_builder_is_a_zoo_attribute():
    from keras_moe import zoo

    names = zoo.list_models()
    assert {"deepmoe_resnet56", "dmoe_mnist", "two_domain_moe", "sparse_moe_classifier",
            "tsne_moe"} <= set(names)
    for name in names:
        assert getattr(zoo, name) is registry.get_builder(name)
        assert name in dir(zoo)
    with pytest.raises(AttributeError, match="no_such_model"):
        zoo.no_such_model
