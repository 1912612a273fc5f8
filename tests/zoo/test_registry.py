"""The zoo registry: registration, families, lookup, suggestions for unknown names."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

import keras_moe.training  # noqa: F401  (registers DeepMoE's phase settings)

from keras_moe import zoo
from keras_moe.zoo import registry

ZOO_SOURCES = pathlib.Path(zoo.__file__).parent


def test_register_list_get_and_suggest(monkeypatch):
    monkeypatch.setattr(registry, "_BUILDERS", {})
    monkeypatch.setattr(registry, "_FAMILY_OF", {})
    monkeypatch.setattr(registry, "_FAMILIES", {})
    family = registry.register_family(registry.ModelFamily("tiny", "a family for this test"))

    @registry.register_model(family=family)
    def tiny_moe(*, num_classes=3, input_shape=(4,)):
        """A tiny model for this test.

        More text.
        """
        return ("built", num_classes, input_shape)

    assert registry.list_models() == ["tiny_moe"]
    assert registry.list_models("moe") == ["tiny_moe"] and registry.list_models("x") == []
    assert registry.describe("tiny_moe") == "A tiny model for this test."
    assert registry.get_model("tiny_moe", num_classes=5) == ("built", 5, (4,))
    assert registry.get_family("tiny_moe") is family
    assert family.phases_for(3) == [{"name": "train", "epochs": 3}]  # no defaults: one phase
    with pytest.raises(ValueError, match="Did you mean 'tiny_moe'"):
        registry.get_model("tiny_mo")
    with pytest.raises(ValueError, match="already registered"):
        def other():
            pass
        other.__name__ = "tiny_moe"
        registry.register_model(other, family=family)
    with pytest.raises(ValueError, match="registered ModelFamily"):
        registry.register_model(lambda: None, family="tiny")
    with pytest.raises(ValueError, match="family named 'tiny' is already"):
        registry.register_family(registry.ModelFamily("tiny", "another"))


def test_a_procedure_registers_phase_settings_against_a_family(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", {})

    def own(model, value, context):
        return False

    def first(model, value):
        pass

    def second(model, value):
        pass

    family = registry.register_family(registry.ModelFamily(
        "tiny", "a family for this test",
        phase_settings={"own": registry.PhaseSetting(apply=own)}))
    settings = {"b": registry.PhaseSetting(on_build=first),
                "a": registry.PhaseSetting(on_build=second)}
    assert registry.register_phase_settings(family, settings) is family
    assert list(family.phase_settings) == ["own", "b", "a"]  # the on_build order
    registry.register_phase_settings(family, settings)  # again (a reload): no change
    assert list(family.phase_settings) == ["own", "b", "a"]
    with pytest.raises(ValueError, match="already has a phase setting 'b'"):
        registry.register_phase_settings(family, {"b": registry.PhaseSetting(on_build=second)})
    with pytest.raises(ValueError, match="'c' must be a PhaseSetting"):
        registry.register_phase_settings(family, {"c": second})
    with pytest.raises(ValueError, match="registered ModelFamily"):
        registry.register_phase_settings(registry.ModelFamily("other", "unregistered"), {})
    assert list(family.phase_settings) == ["own", "b", "a"]


def _imported_modules(path):
    """Every module an `import` or `from ... import` in `path` names, at any depth."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_imports_run_one_way_training_then_zoo_then_layers():
    """The zoo and the layers never import `keras_moe.training` (not even inside a
    function), and the layers never import the zoo; DeepMoE's phase keys come from
    `keras_moe.training.deepmoe`, which registers them when the training package loads."""
    package = ZOO_SOURCES.parent
    offenders = []
    for folder, forbidden in (("zoo", ("keras_moe.training",)),
                              ("layers", ("keras_moe.training", "keras_moe.zoo"))):
        for path in (package / folder).rglob("*.py"):
            for name in _imported_modules(path):
                if name.startswith(forbidden):
                    offenders.append(f"{path.relative_to(package)}: {name}")
    assert offenders == []
    probe = ("import sys, keras_moe.zoo as zoo; "
             "print(sorted(m for m in sys.modules if m.startswith('keras_moe.training'))); "
             "print(sorted(zoo.get_family('deepmoe_resnet56').phase_settings)); "
             "import keras_moe.training; "
             "print(list(zoo.get_family('deepmoe_resnet56').phase_settings))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=package.parent).stdout.splitlines()
    assert out == ["[]", "[]", "['freeze_gating', 'gate_l1', 'embedding_loss_weight', "
                               "'spread_gate_heads', 'gate_density_target']"]


def test_every_registered_builder_is_a_zoo_attribute():
    names = zoo.list_models()
    assert {"deepmoe_resnet56", "dmoe_mnist", "two_domain_moe", "sparse_moe_classifier",
            "tsne_moe"} <= set(names)
    for name in names:
        assert getattr(zoo, name) is registry.get_builder(name)
        assert name in dir(zoo)
    with pytest.raises(AttributeError, match="no_such_model"):
        zoo.no_such_model


def test_every_builder_is_an_explicit_function_that_grep_finds():
    sources = "\n".join(p.read_text() for p in ZOO_SOURCES.rglob("*.py"))
    for name in zoo.list_models():
        builder = registry.get_builder(name)
        assert re.search(rf"^def {name}\(", sources, re.MULTILINE), name
        assert builder.__name__ == name and builder.__code__.co_name == name


def test_families_carry_phases_tuning_and_phase_settings():
    family_of = {name: zoo.get_family(name).name for name in zoo.list_models()}
    assert family_of["deepmoe_resnet56"] == family_of["deepmoe_vgg16"] == "deepmoe"
    assert family_of["resnet56"] == family_of["drn_a50"] == "convnet"
    assert family_of["dmoe_mnist"] == family_of["dmoe_mnist_dnn"] == "eigen"
    assert family_of["tsne_moe"] == "tsne" and family_of["two_domain_moe"] == "two_domain"
    assert family_of["sparse_moe_classifier"] == "shazeer"
    deepmoe = zoo.get_family("deepmoe_resnet_cifar")
    assert [p["name"] for p in deepmoe.phases_for(6)] == ["joint", "finetune"]
    assert deepmoe.phases_for(6)[1] == {"name": "finetune", "epochs": 2, "freeze_gating": True,
                                        "gate_l1": 0.0, "embedding_loss_weight": 0.0}
    assert zoo.get_family("resnet56").phases_for(4) == [{"name": "train", "epochs": 4}]
    settings = {name: sorted(family.phase_settings)
                for name, family in zoo.list_families().items()}
    assert settings == {
        "deepmoe": ["embedding_loss_weight", "freeze_gating", "gate_density_target", "gate_l1",
                    "spread_gate_heads"],
        "convnet": [], "eigen": ["assignment_constraint"], "shazeer": [],
        "tsne": ["tsne_map_epochs"], "two_domain": []}
    assert dict(zoo.get_family("sparse_moe_classifier").search_space) == {
        "num_experts": "experts", "top_k": "top_k", "importance_weight": "decade",
        "load_weight": "decade"}


def test_no_decision_by_name_prefix_or_module_name():
    """What a model is comes from its family registration, never from how it is named."""
    package = ZOO_SOURCES.parent
    offenders = []
    for path in package.rglob("*.py"):
        text = path.read_text()
        for pattern in (r"startswith\(\"(deepmoe|dmoe|tsne|resnet)", r"__module__"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(package)}: {pattern}")
    assert offenders == []
