"""`keras_moe.hub.sparsify` on keras-hub's MoE families, one tiny model each: the
sparsified model's logits equal keras-hub's, greedy `generate()` gives the same tokens,
and a `.keras` round trip and keras-hub presets (`save_to_preset` / `from_preset`, of
keras-hub's model before `sparsify` and of the sparsified one) give the same logits.

Runs on TensorFlow and on JAX (`multi_backend`).
"""

import keras
import numpy as np
import pytest

from testing_utils import to_numpy

keras_hub = pytest.importorskip("keras_hub")
from keras_moe import hub  # noqa: E402  (needs keras_hub)
from keras_moe.layers import MoEDense  # noqa: E402

pytestmark = pytest.mark.multi_backend

VOCAB = 48
COMMON = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=2, num_key_value_heads=1,
              hidden_dim=16, num_experts=4)
# Each family at a tiny size of its own backbone arguments; the Qwen shared experts are
# twice the routed experts' width (two MoEDense shared experts).
FAMILIES = {
    "mixtral": ("MixtralBackbone", "MixtralCausalLM", dict(intermediate_dim=8, top_k=2)),
    "qwen_moe": ("QwenMoeBackbone", "QwenMoeCausalLM", dict(
        intermediate_dim=8, moe_intermediate_dim=8, shared_expert_intermediate_dim=16,
        top_k=2, norm_top_k_prob=False)),
    "qwen3_moe": ("Qwen3MoeBackbone", "Qwen3MoeCausalLM", dict(
        intermediate_dim=8, moe_intermediate_dim=8, top_k=2, head_dim=8,
        norm_top_k_prob=True)),
    "qwen3_5_moe": ("Qwen3_5MoeBackbone", "Qwen3_5MoeCausalLM", dict(
        head_dim=8, moe_intermediate_dim=8, shared_expert_intermediate_size=16, top_k=2,
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=["full_attention", "full_attention"])),
    "gpt_oss": ("GptOssBackbone", "GptOssCausalLM", dict(intermediate_dim=8, top_k=2,
                                                         head_dim=8)),
    # Gemma4's MoE decoders (26B-A4B): a dense MLP beside the experts in every layer.
    "gemma4": ("Gemma4Backbone", "Gemma4CausalLM", dict(
        image_size=16, intermediate_dim=8, head_dim=8, enable_moe_block=True,
        expert_intermediate_dim=8, num_experts_per_token=2, sliding_window_size=4)),
}
PROMPT, LENGTH = 4, 8


def _inputs(name=None):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (2, LENGTH)).astype("int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype=bool)}
    if name == "gemma4":  # Gemma4's backbone also takes the positions
        inputs["position_ids"] = np.tile(np.arange(LENGTH, dtype="int32"), (2, 1))
    return inputs


def _prompt():
    ids = _inputs()["token_ids"].copy()
    mask = np.zeros_like(ids, dtype=bool)
    mask[:, :PROMPT] = True
    ids[~mask] = 0
    return {"token_ids": ids, "padding_mask": mask}


def _generate(causal_lm):
    causal_lm.compile(sampler="greedy")
    return to_numpy(causal_lm.generate(_prompt(), stop_token_ids=None)["token_ids"])


def _causal_lm(name):
    """A tiny keras-hub causal LM of family `name` (no preprocessor)."""
    backbone_name, lm_name, kwargs = FAMILIES[name]
    keras.utils.set_random_seed(0)
    backbone = getattr(keras_hub.models, backbone_name)(**COMMON, **kwargs)
    rng = np.random.default_rng(1)
    for w in backbone.trainable_weights:  # away from the initializers' zeros and ones
        w.assign(rng.normal(0, 0.5, w.shape).astype(w.dtype))
    return getattr(keras_hub.models, lm_name)(backbone=backbone, preprocessor=None)


def _from_preset(name, path, **kwargs):
    """`keras_hub.models.CausalLM.from_preset(path)`; for Gemma4, whose backbone has two
    causal-LM tasks (Gemma4CausalLM, Gemma4AssistantCausalLM) between which keras-hub's
    lookup does not choose, the family's class."""
    cls = (getattr(keras_hub.models, FAMILIES[name][1]) if name == "gemma4"
           else keras_hub.models.CausalLM)
    return cls.from_preset(str(path), **kwargs)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """A tiny keras-hub causal LM, its logits and greedy tokens, then sparsified."""
    causal_lm = _causal_lm(request.param)
    logits = to_numpy(causal_lm(_inputs(request.param)))
    tokens = _generate(causal_lm)
    hub.sparsify(causal_lm)
    return request.param, causal_lm, logits, tokens


def test_logits_equal_keras_hubs(family):
    name, causal_lm, logits, _ = family
    blocks = [layer for layer in causal_lm.backbone._flatten_layers()
              if isinstance(layer, (hub.HubMoEBlock, hub.HubExpertBank))]
    assert len(blocks) == COMMON["num_layers"]
    assert all(isinstance(block, hub.HubExpertBank) or isinstance(block.moe, MoEDense)
               for block in blocks)
    hub_classes = tuple(type(layer).__name__ for layer in causal_lm.backbone._flatten_layers())
    assert not {"MixtralSparseMoeBlock", "Gemma4MoEBlock", "GptOssExperts"} & set(hub_classes)
    assert type(causal_lm.backbone).__name__ == "Sparse" + FAMILIES[name][0]
    np.testing.assert_allclose(to_numpy(causal_lm(_inputs(name))), logits,
                               rtol=1e-5, atol=1e-5)


def test_greedy_generate_gives_the_same_tokens(family):
    _, causal_lm, _, tokens = family
    got = _generate(causal_lm)
    assert (got[:, PROMPT:] != 0).any()  # something was generated
    np.testing.assert_array_equal(got, tokens)


@pytest.mark.slow
def test_keras_file_round_trip_keeps_the_logits(family, tmp_path):
    name, causal_lm, logits, _ = family
    path = str(tmp_path / f"{name}.keras")
    causal_lm.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored.backbone).__name__ == "Sparse" + FAMILIES[name][0]
    assert any(isinstance(layer, (hub.HubMoEBlock, hub.HubExpertBank))
               for layer in restored.backbone._flatten_layers())
    np.testing.assert_allclose(to_numpy(restored(_inputs(name))), logits,
                               rtol=1e-5, atol=1e-5)


def _is_sparse(causal_lm, name):
    backbone = causal_lm.backbone
    layers = list(backbone._flatten_layers())
    return (type(backbone).__name__ == "Sparse" + FAMILIES[name][0]
            and type(causal_lm).__name__ == "Sparse" + FAMILIES[name][1]
            and sum(isinstance(layer, (hub.HubMoEBlock, hub.HubExpertBank))
                    for layer in layers) == COMMON["num_layers"])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_preset_of_keras_hubs_model_loads_then_sparsifies_to_its_logits(name, tmp_path):
    """keras-hub's own model: `save_to_preset`, `from_preset` (no tokenizer: the task
    config has no preprocessor), then `sparsify` the loaded model."""
    causal_lm = _causal_lm(name)
    logits = to_numpy(causal_lm(_inputs(name)))
    causal_lm.save_to_preset(str(tmp_path))
    loaded = _from_preset(name, tmp_path)
    assert type(loaded) is type(causal_lm) and loaded.preprocessor is None
    hub.sparsify(loaded)
    assert _is_sparse(loaded, name)
    np.testing.assert_allclose(to_numpy(loaded(_inputs(name))), logits, rtol=1e-5, atol=1e-5)


def test_preset_of_a_sparsified_model_loads_sparsified(family, tmp_path):
    """A sparsified model's preset: the backbone's config records the conversion
    (`keras_moe>Sparse<Backbone>`, `sparse_moe`) and the task's class is
    `keras_moe>Sparse<Task>`, so `CausalLM.from_preset` finds the task, builds it
    sparsified and loads the sparse weights; a backbone-only preset loads the same."""
    name, causal_lm, logits, _ = family
    causal_lm.save_to_preset(str(tmp_path / "task"))
    loaded = _from_preset(name, tmp_path / "task")
    assert _is_sparse(loaded, name) and loaded.preprocessor is None
    assert loaded.backbone.get_config()["sparse_moe"] == causal_lm.backbone.get_config()[
        "sparse_moe"]
    np.testing.assert_allclose(to_numpy(loaded(_inputs(name))), logits, rtol=1e-5, atol=1e-5)

    causal_lm.backbone.save_to_preset(str(tmp_path / "backbone"))
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "backbone"))
    assert type(backbone) is type(causal_lm.backbone)
    loaded = _from_preset(name, tmp_path / "backbone", preprocessor=None)  # no tokenizer
    assert _is_sparse(loaded, name)
    np.testing.assert_allclose(to_numpy(loaded(_inputs(name))), logits, rtol=1e-5, atol=1e-5)


def test_unsupported_models_are_refused_naming_the_families():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError,
                       match="mixtral, qwen_moe, qwen3_moe, qwen3_5_moe, gpt_oss, gemma4"):
        hub.sparsify(model)


def test_a_sparsified_model_is_not_sparsified_twice(family):
    _, causal_lm, _, _ = family
    with pytest.raises(ValueError, match="already sparsified"):
        hub.sparsify(causal_lm)


def test_expert_use_reports_each_blocks_assignment_shares(family):
    name, causal_lm, _, _ = family
    shares = hub.expert_use(causal_lm, _inputs(name))
    assert len(shares) == COMMON["num_layers"]
    for share in shares.values():
        assert share.shape == (COMMON["num_experts"],)
        np.testing.assert_allclose(share.sum(), 1.0)
        # 2 x 8 tokens, top-2: shares are multiples of 1 / 32 assignments
        np.testing.assert_allclose(share * 32, np.round(share * 32), atol=1e-9)
