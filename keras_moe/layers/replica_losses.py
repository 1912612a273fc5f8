"""Per-replica bookkeeping of `add_loss` terms.

Keras keeps a layer's `add_loss` terms in one list on the layer object. Under
`tf.distribute.MirroredStrategy` every replica runs the same layer object in its own
thread, so each replica's loss list picks up the other replicas' terms (and a replica's
clear can drop another's): the training objective and the reported loss come out wrong.
Layers that add losses inherit `ReplicaLocalLossesMixin`, which files each term under the
thread that created it and hands a replica back only its own. The two Keras hooks it
replaces are private (`keras_moe.compat.OWN_LOSSES`, `CLEAR_LOSSES`).
"""

import threading

from keras import ops, tree

from keras_moe import compat


def per_thread(owner, name):
    """A `{thread id: value}` dict kept on `owner` under `name`, outside Keras's attribute
    tracking: per replica under `MirroredStrategy` (one thread each)."""
    store = owner.__dict__.get(name)
    if store is None:
        store = {}
        object.__setattr__(owner, name, store)
    return store


class ReplicaLocalLossesMixin:
    """Keeps `add_loss` terms per thread (per replica); mix in before `keras.layers.Layer`."""

    def _losses_by_thread(self):
        return per_thread(self, "_replica_local_losses")

    def add_loss(self, loss):
        if compat.in_stateless_scope():
            return super().add_loss(loss)
        losses = tree.flatten(loss)
        for value in losses:
            if not ops.is_tensor(value):
                raise ValueError(
                    "`add_loss()` can only be called from inside `build()` or `call()`, "
                    f"on a tensor; got {value!r}."
                )
        self._losses_by_thread().setdefault(threading.get_ident(), []).extend(losses)


def _own_losses(self):
    losses = getattr(super(ReplicaLocalLossesMixin, self), compat.OWN_LOSSES)()
    if not compat.in_stateless_scope():
        losses = losses + list(self._losses_by_thread().get(threading.get_ident(), []))
    return losses


def _clear_losses(self):
    getattr(super(ReplicaLocalLossesMixin, self), compat.CLEAR_LOSSES)()
    self._losses_by_thread().pop(threading.get_ident(), None)


compat.override(ReplicaLocalLossesMixin, compat.OWN_LOSSES, _own_losses)
compat.override(ReplicaLocalLossesMixin, compat.CLEAR_LOSSES, _clear_losses)
