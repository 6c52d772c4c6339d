"""The Android app's ONNX decode loop and the Python loop build the same decoder inputs.

The Java loop cannot run here (no Android runtime), so the test reads what `OnnxGenerator.buildDecoderInputs` and
`pastTensor` build (input names, dtypes by buffer type, shapes) from the Java source, builds exactly those inputs in
Python and runs them through a real exported decoder on ONNX Runtime, next to `build_decoder_feed`. A renamed input,
a changed dtype or a changed shape on either side fails here.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from g3n_export.checkpoint import open_checkpoint
from g3n_export.runtime.onnx import OnnxGenerator, build_decoder_feed, decoder_input_names
from g3n_export.synthetic import make_synthetic
from g3n_export.targets.onnx import export_onnx
from g3n_export.targets.recipe import OnnxSpec

JAVA = Path(__file__).parents[1] / "android_demo/app/src/main/java/org/g3nexport/demo/OnnxGenerator.java"


@pytest.fixture(scope="module")
def java_source() -> str:
    return JAVA.read_text()


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> OnnxGenerator:
    root = tmp_path_factory.mktemp("contract")
    model = make_synthetic("tiny", root / "model", seed=5)
    out = root / "onnx"
    export_onnx(open_checkpoint(model), out, OnnxSpec(linear="fp32", embedding="fp32", ple="fp32"),
                max_seq_len=64, ort=False)
    return OnnxGenerator(out, prefer_ort=False)


def java_feed(source: str, inputs_embeds, per_layer_inputs, past, kv_layers, heads, head_dim) -> dict:
    """Build the decoder feed the way the Java source says it does, reading names, buffers and shapes from it."""
    body = source[source.index("static Map<String, OnnxTensor> buildDecoderInputs"):]
    body = body[: body.index("\n    }\n")]
    created = dict(re.findall(r'created\.put\("(\w+)", (\w+)\)', body))
    tensors = {}
    for var, buffer, shape in re.findall(r"OnnxTensor (\w+) = OnnxTensor\.createTensor\(env, (\w+)\.wrap\(\w+\), new long\[\] \{([^}]*)\}\)", body):
        tensors[var] = (buffer, [s.strip() for s in shape.split(",")])
    assert set(created.values()) == set(tensors), body

    p = 0 if past is None else next(iter(past.values())).shape[2]
    t = inputs_embeds.shape[1]
    feed = {"inputs_embeds": inputs_embeds.astype(np.float32), "per_layer_inputs": per_layer_inputs.astype(np.float32)}
    for name, var in created.items():
        buffer, shape = tensors[var]
        dtype = {"LongBuffer": np.int64, "FloatBuffer": np.float32}[buffer]
        assert shape[0] == "1"
        if shape[1] == "mask.length":  # the mask array has P + T ones
            feed[name] = np.ones((1, p + t), dtype=dtype)
        elif shape[1] == "stepLength":  # positions P .. P + T - 1
            assert "positions[i] = pastLength + i" in body
            feed[name] = np.arange(p, p + t, dtype=dtype)[None, :]
        else:
            raise AssertionError(f"unexpected Java shape {shape} for {name}")
    assert 'inputs.put("inputs_embeds", inputsEmbeds)' in body
    assert 'inputs.put("per_layer_inputs", perLayerInputs)' in body

    # First step: pastTensor builds empty float tensors [1, heads, 0, head_dim] named past_key_values.{layer}.{kind}.
    assert '"past_key_values." + layer + "." + kind' in source
    assert "FloatBuffer.allocate(0)" in source
    assert "new long[] {1, folder.numKeyValueHeads, 0, folder.headDim}" in source
    assert '"present." + layer + "." + kind' in source
    for layer in kv_layers:
        for kind in ("key", "value"):
            name = f"past_key_values.{layer}.{kind}"
            feed[name] = (np.zeros((1, heads, 0, head_dim), np.float32) if past is None
                          else past[name])
    return feed


def test_java_and_python_feeds_agree(java_source, generator):
    prompt = [2, 17, 99, 5, 300, 41]
    past = None
    for step in (prompt, [7], [8]):
        embeds, per_layer = generator.embed(np.array([step], dtype=np.int64))
        python = build_decoder_feed(embeds, per_layer, past, generator.kv_layers, generator.num_kv_heads, generator.head_dim)
        java = java_feed(java_source, embeds, per_layer, past, generator.kv_layers, generator.num_kv_heads,
                         generator.head_dim)
        assert set(java) == set(python) == set(decoder_input_names(generator.kv_layers))
        for name in python:
            assert java[name].dtype == python[name].dtype, name
            assert java[name].shape == python[name].shape, name
            np.testing.assert_array_equal(java[name], python[name], err_msg=name)

        outputs = generator.decoder_session.run(generator.output_names, java)
        reference, present = generator.logits(step, past)
        np.testing.assert_allclose(outputs[0], reference, atol=1e-6)
        past = present


def test_java_checks_kv_layers_like_the_decoder(java_source, generator):
    inputs = {i.name for i in generator.decoder_session.get_inputs()}
    assert inputs == set(decoder_input_names(generator.kv_layers))
    assert "folder.kvLayers" in java_source
