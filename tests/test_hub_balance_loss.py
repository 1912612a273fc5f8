"""The balancing loss `keras_moe.hub.sparsify` gives each keras-hub family, against
keras-hub's own: the same Switch formula (`E * sum_e f_e P_e`) times the family's
coefficient, so a sparsified model trains against the auxiliary loss it had. Checked on
one MoE block of each family that has a loss, on unpadded tokens (keras-hub's
`compute_load_balancing_loss` also masks padding, which ours does not; the card says so).

Also `keras_moe.hub.sparse_block` on one block of each of the six families: the sparse
block computes what keras-hub's does, and bad arguments are refused naming them.

Runs on TensorFlow and on JAX (`multi_backend`).
"""

import keras
import numpy as np
import pytest

from testing_utils import to_numpy

keras_hub = pytest.importorskip("keras_hub")
from keras_moe import hub  # noqa: E402  (needs keras_hub)

pytestmark = pytest.mark.multi_backend

D, F, E, K, TOKENS = 8, 4, 6, 2, 20


def _hub_block(family):
    if family == "mixtral":
        from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock

        return MixtralSparseMoeBlock(D, F, E, top_k=K, router_aux_loss_coef=0.3)
    if family == "qwen_moe":
        from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenSparseMoeBlock

        return QwenSparseMoeBlock(D, F, 2 * F, E, K, norm_top_k_prob=False,
                                  router_aux_loss_coefficient=0.3)
    if family == "qwen3_moe":
        from keras_hub.src.models.qwen3_moe.qwen3_moe_decoder import Qwen3SparseMoeBlock

        return Qwen3SparseMoeBlock(D, F, E, K, norm_top_k_prob=True,
                                   router_aux_loss_coefficient=0.3)
    if family == "gpt_oss":
        from keras_hub.src.models.gpt_oss.gpt_oss_decoder import GptOssSparseMoeBlock

        return GptOssSparseMoeBlock(D, F, E, top_k=K)
    if family == "gemma4":
        from keras_hub.src.models.gemma4.gemma4_moe import Gemma4MoEBlock

        return Gemma4MoEBlock(E, D, F)
    assert family == "qwen3_5_moe"
    from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder import Qwen3_5MoeSparseMoeBlock

    return Qwen3_5MoeSparseMoeBlock(D, F, 2 * F, E, K, router_aux_loss_coefficient=0.3)


def _randomized(block, scale=0.5, seed=3):
    """`block`, built, its weights away from the initializers' zeros and ones."""
    block.build((None, D) if type(block).__name__ == "Gemma4MoEBlock" else (None, None, D))
    rng = np.random.default_rng(seed)
    for w in block.trainable_weights:
        w.assign(rng.normal(0, scale, w.shape).astype(w.dtype))
    return block


@pytest.mark.parametrize("family", ["mixtral", "qwen_moe", "qwen3_moe", "qwen3_5_moe"])
def test_sparsified_block_keeps_the_familys_balancing_loss(family):
    keras.utils.set_random_seed(0)
    block = _randomized(_hub_block(family), scale=1.0)  # a router far from uniform
    x = np.random.default_rng(4).normal(size=(2, TOKENS // 2, D)).astype("float32")
    block(x, training=True)
    hub_losses = [float(to_numpy(v)) for v in block.losses]
    assert len(hub_losses) == 1

    sparse = hub.sparse_block(block)
    outputs = sparse(x, training=True)
    ours = [float(to_numpy(v)) for v in sparse.losses]
    assert len(ours) == 1
    np.testing.assert_allclose(ours[0], hub_losses[0], rtol=1e-5)
    # The formula written out, from keras-hub's router: E * sum_e f_e P_e, f_e the share
    # of the k * tokens assignments, P_e the mean routing probability, times 0.3.
    logits = to_numpy(outputs[1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1)[:, :K]
    share = np.bincount(chosen.ravel(), minlength=E) / chosen.size
    want = 0.3 * E * np.sum(share * probs.mean(0))
    np.testing.assert_allclose(ours[0], want, rtol=1e-5)
    assert not np.isclose(want, 0.3)  # not the balanced value: the test could fail

    # No loss at inference, as keras-hub's block.
    sparse(x, training=False)
    assert [float(to_numpy(v)) for v in sparse.losses] == []


@pytest.mark.parametrize("family", ["gemma4", "gpt_oss", "mixtral", "qwen3_5_moe",
                                    "qwen3_moe", "qwen_moe"])
def test_sparse_block_computes_what_keras_hubs_block_does(family):
    keras.utils.set_random_seed(0)
    block = _randomized(_hub_block(family))
    rng = np.random.default_rng(5)
    if family == "gemma4":  # the bank, called with a router's top-K dispatch weights
        from keras_hub.src.models.gemma4.gemma4_moe import Gemma4Router

        router = _randomized(Gemma4Router(E, K))
        x = rng.normal(size=(TOKENS, D)).astype("float32")
        weights = router(x[None])
        assert (to_numpy(weights) > 0).sum(-1).tolist() == [K] * TOKENS
        sparse = hub.sparse_block(block, top_k=K)
        assert isinstance(sparse, hub.HubExpertBank)
        want, got = to_numpy(block(x, weights)), to_numpy(sparse(x, weights))
    else:
        x = rng.normal(size=(2, TOKENS // 2, D)).astype("float32")
        sparse = hub.sparse_block(block, balance_loss=None)
        assert isinstance(sparse, hub.HubMoEBlock) and sparse.losses == []
        hub_outputs, ours = block(x), sparse(x)
        want, got = (to_numpy(o[0] if isinstance(o, (tuple, list)) else o)
                     for o in (hub_outputs, ours))
    assert np.abs(want).max() > 1e-2  # weights far from zero: the outputs are not trivial
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sparse_block_refuses_what_it_cannot_convert_naming_it():
    with pytest.raises(ValueError, match="Dense is not a keras-hub MoE block.*supported: "
                                         "Gemma4MoEBlock, GptOssSparseMoeBlock"):
        hub.sparse_block(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="build the MixtralSparseMoeBlock first"):
        hub.sparse_block(_hub_block("mixtral"))
    with pytest.raises(ValueError, match="Gemma4MoEBlock needs `top_k`"):
        hub.sparse_block(_randomized(_hub_block("gemma4")))
    with pytest.raises(ValueError, match="`top_k` is for Gemma4's expert bank only"):
        hub.sparse_block(_randomized(_hub_block("mixtral")), top_k=2)
    with pytest.raises(ValueError, match="`dispatch` must be one of"):
        hub.sparse_block(_randomized(_hub_block("mixtral")), dispatch="nope")


def test_blocks_the_converter_cannot_reproduce_are_refused_naming_the_caller():
    from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenSparseMoeBlock

    gpt_oss = _randomized(_hub_block("gpt_oss"))
    gpt_oss.experts.alpha = 1.5  # keras-hub's experts take other constants
    with pytest.raises(ValueError, match=r"^sparse_block: GptOssSparseMoeBlock: GPT-OSS "
                                         r"experts with alpha=1.5, limit=7.0"):
        hub.sparse_block(gpt_oss)
    # A shared expert of width F + 1: not a multiple of the routed experts' width F.
    odd_shared = QwenSparseMoeBlock(D, F, F + 1, E, K, norm_top_k_prob=False)
    odd_shared.build((None, None, D))
    with pytest.raises(ValueError, match=rf"^sparse_block: QwenSparseMoeBlock: the shared "
                                         rf"expert's hidden width \({F + 1}\) must be a "
                                         rf"multiple of the routed experts' \({F}\)"):
        hub.sparse_block(odd_shared)
    with pytest.raises(ValueError, match=r"^sparse_block: Gemma4MoEBlock: Gemma4 keeps its "
                                         r"own router"):
        hub.sparse_block(_randomized(_hub_block("gemma4")), top_k=K,
                         balance_loss=["switch_load_balance"])
