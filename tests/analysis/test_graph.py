"""`keras_moe.analysis.graph`: the one walker of functional graphs."""

import keras
import numpy as np
import pytest

from keras_moe.analysis import graph


def _model():
    x = keras.Input((4,), name="x")
    h = keras.layers.Dense(3, name="a")(x)
    y = keras.layers.Dense(2, name="b")(keras.layers.ReLU(name="r")(h))
    return keras.Model(x, [y, h])


def test_nodes_come_in_topological_order_with_producers_and_consumers():
    model = _model()
    nodes = graph.call_nodes(model)
    assert [graph.operation(n).name for n in nodes] == ["a", "r", "b"]
    producers = graph.producers(nodes)
    consumers = graph.consumers(nodes, model.outputs)
    a_out = graph.call_outputs(nodes[0])[0]
    assert producers[id(a_out)] is nodes[0]
    # Read by the ReLU, and an output of the model (None).
    assert [(n and graph.operation(n).name, p) for n, p in consumers[id(a_out)]] == [
        ("r", 0), (None, 0)]


def test_replaying_nodes_on_values_computes_what_the_model_computes():
    model = _model()
    x = np.arange(8, dtype="float32").reshape(2, 4)
    values = {id(model.inputs[0]): keras.ops.convert_to_tensor(x)}
    for node in graph.call_nodes(model):
        for tensor, value in zip(graph.call_outputs(node), graph.run_node(node, values)):
            values[id(tensor)] = value
    expected = model(x)
    np.testing.assert_allclose(values[id(model.outputs[0])], expected[0], atol=1e-6)
    sub = graph.submodel(model, graph.call_outputs(graph.call_nodes(model)[1])[0])
    np.testing.assert_allclose(sub(x), np.maximum(expected[1], 0), atol=1e-6)


def test_a_sequential_has_a_graph_and_a_subclassed_model_is_named_in_the_error():
    sequential = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    assert [graph.operation(n).name for n in graph.call_nodes(sequential)] == ["d"]

    class Opaque(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="'opaque' \\(Opaque\\) is not a functional model"):
        graph.functional(Opaque(name="opaque"))
    assert not graph.has_graph(Opaque())
    nested = keras.Model(sequential.inputs, sequential.outputs)
    outer_in = keras.Input((4,))
    outer = keras.Model(outer_in, nested(outer_in))
    names = [layer.name for layer in graph.layers(outer)]
    assert "d" in names  # nested layers too
