"""The folds of captool.export.fold: the input normalization into the encoder's first convolution.

Parity first (the folded encoder against the unfolded one and against PyTorch, tensors then
tokens), then the rewrite's own guards on hand-made graphs.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from captool.export.fold import fold_normalization  # noqa: E402
from captool.export.graphs import export_encoder  # noqa: E402
from captool.export.validate import load_model  # noqa: E402


def run(path_or_model, image: np.ndarray) -> list[np.ndarray]:
    source = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: image})


def extreme_images(batch: int, size: int) -> np.ndarray:
    """uint8 (N, 3, S, S): random pixels, one all-black and one all-white image (the padded borders
    of the first convolution are where a fold into the bias alone would go wrong)."""
    images = np.random.default_rng(1).integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
    images[0], images[1] = 0, 255
    return images


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["rnn", "attention"])
def test_folded_encoder_equals_unfolded_and_pytorch(tiny_checkpoint, tmp_path, cell):
    model = load_model(tiny_checkpoint(cell))
    export_encoder(model, tmp_path / "folded.onnx")
    export_encoder(model, tmp_path / "plain.onnx", fold=False)
    folded, plain = (onnx.load(str(tmp_path / n)) for n in ("folded.onnx", "plain.onnx"))
    ops = Counter(n.op_type for n in folded.graph.node)
    assert Counter(n.op_type for n in plain.graph.node) - ops == Counter({"Div": 2})  # the two Divs, nothing else
    assert [n.op_type for n in folded.graph.node[:3]] == ["Cast", "Sub", "Conv"]

    images = extreme_images(5, model.config.image_size)  # traced at batch 2: another batch size
    got, want = run(str(tmp_path / "folded.onnx"), images), run(str(tmp_path / "plain.onnx"), images)
    names = [o.name for o in folded.graph.output]
    with torch.no_grad():
        reference = model.encode(torch.from_numpy(images))
    for name, g, w in zip(names, got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(g, reference[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_folded_bundle_gives_pytorch_tokens(tiny_bundle, tiny_checkpoint):
    """The bundle export writes (folded encoder) captions as the checkpoint does, token for token."""
    from captool import Captioner

    bundle = tiny_bundle("attention")
    encoder = onnx.load(str(bundle / "encoder.onnx"))
    assert "Div" not in Counter(n.op_type for n in encoder.graph.node)
    model = load_model(tiny_checkpoint("attention"))
    images = extreme_images(6, model.config.image_size)
    with torch.no_grad():
        want = model.sample(torch.from_numpy(images), max_length=model.config.max_length).numpy()
    got = Captioner(bundle, device="cpu").generate(images, max_length=want.shape[1])
    np.testing.assert_array_equal(got, want)


def normalization_graph(group: int = 1, pads: int = 1) -> onnx.ModelProto:
    """Cast -> Div 255 -> Sub mean -> Div std -> Conv, as torch.onnx writes the encoder's front."""
    rng = np.random.default_rng(0)
    c_out = 4 if group == 1 else 3
    inits = [numpy_helper.from_array(np.array(255.0, np.float32), "s"),
             numpy_helper.from_array(np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1), "mean"),
             numpy_helper.from_array(np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1), "std"),
             numpy_helper.from_array(rng.standard_normal((c_out, 3 // group, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b")]
    nodes = [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["f", "s"], ["d"]), helper.make_node("Sub", ["d", "mean"], ["m"]),
             helper.make_node("Div", ["m", "std"], ["n"]),
             helper.make_node("Conv", ["n", "w", "b"], ["y"], pads=[pads] * 4, strides=[2, 2], group=group)]
    graph = helper.make_graph(nodes, "front", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c_out, "H", "W"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("pads", [0, 1])
def test_fold_normalization_on_a_hand_made_front(pads):
    model = normalization_graph(pads=pads)
    images = extreme_images(3, 9)
    want = run(model, images)[0]
    assert fold_normalization(model) is True
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Cast", "Sub", "Conv"]
    assert {i.name for i in model.graph.initializer} == {"mean_in_pixels", "w_normalized", "b"}
    np.testing.assert_allclose(run(model, images)[0], want, rtol=1e-5, atol=1e-4)
    assert fold_normalization(model) is False  # nothing left to fold


def test_fold_normalization_leaves_other_graphs_alone():
    grouped = normalization_graph(group=3)  # a depthwise first conv: the weights' channels are not the input's
    before = grouped.SerializeToString()
    assert fold_normalization(grouped) is False and grouped.SerializeToString() == before
    shared = normalization_graph()
    shared.graph.output.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, None))  # an intermediate read twice
    before = shared.SerializeToString()
    assert fold_normalization(shared) is False and shared.SerializeToString() == before
