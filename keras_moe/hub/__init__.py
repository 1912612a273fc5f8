"""keras-hub's MoE language models, made sparse: `sparsify(model)`.

keras-hub 0.32's MoE families compute every expert on every token (their expert banks
are one einsum over all experts). `sparsify` swaps each MoE block of a keras-hub
backbone or `CausalLM` for a `HubMoEBlock` holding a `keras_moe.layers.MoEDense` with
the same gated experts, router and weights, so that only the chosen experts run; the
rest of the model (attention, norms, embeddings, the non-MoE feed-forward layers,
`generate()`) is untouched. Gemma4 keeps its router (it reads other inputs than its
experts); its expert bank becomes a `HubExpertBank`. Supported families: see
`SUPPORTED_FAMILIES`.

Needs keras-hub (`pip install --no-deps keras-hub==0.32.0 tokenizers`; see the README).
"""

from keras_moe.hub.convert import (
    SUPPORTED_FAMILIES,
    HubExpertBank,
    HubMoEBlock,
    expert_use,
    sparse_backbone_class,
    sparse_block,
    sparse_task_class,
    sparsify,
)

__all__ = ["SUPPORTED_FAMILIES", "HubExpertBank", "HubMoEBlock", "expert_use",
           "sparse_backbone_class", "sparse_block", "sparse_task_class", "sparsify"]
