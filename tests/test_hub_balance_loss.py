"""The balancing loss `keras_moe.hub.sparsify` gives each keras-hub family, against
keras-hub's own: the same Switch formula (`E * sum_e f_e P_e`) times the family's
coefficient, so a sparsified model trains against the auxiliary loss it had. Checked on
one MoE block of each family that has a loss, on unpadded tokens (keras-hub's
`compute_load_balancing_loss` also masks padding, which ours does not; the card says so).

Runs on TensorFlow and on JAX (`multi_backend`).
"""

import keras
import numpy as np
import pytest

from testing_utils import to_numpy

keras_hub = pytest.importorskip("keras_hub")
from keras_moe.hub import convert  # noqa: E402  (needs keras_hub)

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
    assert family == "qwen3_5_moe"
    from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder import Qwen3_5MoeSparseMoeBlock

    return Qwen3_5MoeSparseMoeBlock(D, F, 2 * F, E, K, router_aux_loss_coefficient=0.3)


def _converter(family):
    return next(conv for fam, _, _, conv in convert.FAMILIES.values() if fam == family)


@pytest.mark.parametrize("family", ["mixtral", "qwen_moe", "qwen3_moe", "qwen3_5_moe"])
def test_sparsified_block_keeps_the_familys_balancing_loss(family):
    keras.utils.set_random_seed(0)
    block = _hub_block(family)
    block.build((None, None, D))
    rng = np.random.default_rng(3)
    for w in block.trainable_weights:  # a router far from uniform: the loss moves
        w.assign(rng.normal(0, 1.0, w.shape).astype(w.dtype))
    x = rng.normal(size=(2, TOKENS // 2, D)).astype("float32")
    block(x, training=True)
    hub_losses = [float(to_numpy(v)) for v in block.losses]
    assert len(hub_losses) == 1

    sparse = convert._converted_block(block, _converter(family), convert._options())
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
