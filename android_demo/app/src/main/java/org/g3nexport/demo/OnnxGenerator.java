package org.g3nexport.demo;

import java.nio.FloatBuffer;
import java.nio.LongBuffer;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Set;

import ai.onnxruntime.OnnxTensor;
import ai.onnxruntime.OnnxValue;
import ai.onnxruntime.OrtEnvironment;
import ai.onnxruntime.OrtException;
import ai.onnxruntime.OrtSession;

/**
 * Greedy generation loop over onnx/embed_tokens and onnx/decoder_model_merged with ONNX Runtime's Java API.
 *
 * <p>Per step: {@code embed_tokens(input_ids)} gives {@code inputs_embeds} and {@code per_layer_inputs}, then
 * {@code decoder_model_merged} takes them with the attention mask, position ids and the KV cache of the layers in
 * manifest {@code kv_layers}, and returns logits and the grown cache. The first call passes empty past tensors.
 */
final class OnnxGenerator implements TextGenerator {
    private final ExportFolder folder;
    private final ProcessMemory memory;
    private OrtEnvironment env;
    private OrtSession embedSession;
    private OrtSession decoderSession;
    private HfTokenizer tokenizer;
    private volatile boolean stopRequested;

    OnnxGenerator(ExportFolder folder, ProcessMemory memory) {
        this.folder = folder;
        this.memory = memory;
    }

    @Override
    public void load() throws Exception {
        env = OrtEnvironment.getEnvironment();
        OrtSession.SessionOptions options = new OrtSession.SessionOptions();
        options.setOptimizationLevel(OrtSession.SessionOptions.OptLevel.ALL_OPT);
        embedSession = env.createSession(
                ExportFolder.requireFile(folder.onnxModel("embed_tokens")).getAbsolutePath(), options);
        decoderSession = env.createSession(
                ExportFolder.requireFile(folder.onnxModel("decoder_model_merged")).getAbsolutePath(), options);
        checkDecoderInputs(decoderSession.getInputNames());
        tokenizer = HfTokenizer.load(folder.onnxTokenizer());
    }

    @Override
    public void generate(String userMessage, int maxNewTokens, Listener listener) throws OrtException {
        if (decoderSession == null) {
            throw new IllegalStateException("ONNX model is not loaded; call load() first");
        }
        stopRequested = false;

        List<Integer> promptIds = new ArrayList<>();
        promptIds.add(folder.bosTokenId);
        promptIds.addAll(tokenizer.encode(ChatFormat.singleTurnPrompt(userMessage)));
        if (promptIds.size() >= folder.maxSeqLen) {
            throw new IllegalArgumentException("Prompt has " + promptIds.size()
                    + " tokens but the model's max_seq_len is " + folder.maxSeqLen + "; shorten the message");
        }
        int newTokenLimit = Math.min(maxNewTokens, folder.maxSeqLen - promptIds.size());

        List<Integer> generated = new ArrayList<>();
        String emittedText = "";
        OrtSession.Result previous = null;
        int pastLength = 0;
        List<Integer> stepIds = promptIds;
        long start = System.nanoTime();
        long prefillEnd = 0;
        try {
            while (generated.size() < newTokenLimit && !stopRequested) {
                OrtSession.Result result = runStep(stepIds, pastLength, previous);
                if (previous != null) {
                    previous.close();
                }
                previous = result;
                pastLength += stepIds.size();
                int next = argmaxLastRow((OnnxTensor) require(result, "logits"), stepIds.size());
                if (prefillEnd == 0) {
                    prefillEnd = System.nanoTime();
                }
                if (folder.isEos(next)) {
                    break;
                }
                generated.add(next);
                stepIds = java.util.Collections.singletonList(next);

                // Decoding the whole reply each step keeps characters that span several byte tokens intact.
                // Text that ends in U+FFFD is held back, because its last bytes do not form a character yet.
                String text = tokenizer.decode(generated);
                if (!text.endsWith("\uFFFD") && text.startsWith(emittedText)) {
                    listener.onText(text.substring(emittedText.length()));
                    emittedText = text;
                }
            }
        } finally {
            if (previous != null) {
                previous.close();
            }
        }
        long end = System.nanoTime();
        listener.onStats(String.format(Locale.US,
                "ONNX Runtime: prefill %d tok at %.1f tok/s, decode %d tok at %.1f tok/s, PSS %d MiB",
                promptIds.size(), rate(promptIds.size(), prefillEnd - start),
                generated.size(), rate(generated.size(), end - prefillEnd), memory.pssMiB()));
    }

    /** Runs embed_tokens then decoder_model_merged for {@code stepIds} at positions pastLength and on. */
    private OrtSession.Result runStep(List<Integer> stepIds, int pastLength, OrtSession.Result previous)
            throws OrtException {
        Map<String, OnnxTensor> created = new HashMap<>();
        try (OnnxTensor inputIds = longTensor(toLongs(stepIds, 0), new long[] {1, stepIds.size()});
             OrtSession.Result embedded = embedSession.run(singleInput("input_ids", inputIds))) {
            Map<String, OnnxTensor> pastKeyValues = new HashMap<>();
            for (int layer : folder.kvLayers) {
                pastKeyValues.put("past_key_values." + layer + ".key", pastTensor(previous, layer, "key", created));
                pastKeyValues.put("past_key_values." + layer + ".value",
                        pastTensor(previous, layer, "value", created));
            }
            Map<String, OnnxTensor> inputs = buildDecoderInputs(
                    env,
                    (OnnxTensor) require(embedded, "inputs_embeds"),
                    (OnnxTensor) require(embedded, "per_layer_inputs"),
                    pastLength,
                    stepIds.size(),
                    pastKeyValues,
                    created);
            return decoderSession.run(inputs);
        } finally {
            for (OnnxTensor tensor : created.values()) {
                tensor.close();
            }
        }
    }

    /**
     * Builds the decoder_model_merged inputs for one step, batch size 1:
     * <ul>
     *   <li>{@code inputs_embeds} float32 [1, T, hidden_size] and {@code per_layer_inputs} float32
     *       [1, T, num_hidden_layers, hidden_size_per_layer_input], passed through from embed_tokens;</li>
     *   <li>{@code attention_mask} int64 [1, P + T], all ones;</li>
     *   <li>{@code position_ids} int64 [1, T] with values P, P+1, ..., P+T-1;</li>
     *   <li>{@code past_key_values.{i}.key} and {@code .value} float32 [1, num_key_value_heads, P, head_dim]
     *       for each i in kv_layers, passed through from {@code pastKeyValues}.</li>
     * </ul>
     * P is {@code pastLength}, T is {@code stepLength}. Tensors this method creates are also put in
     * {@code created} so the caller closes them after the run.
     */
    static Map<String, OnnxTensor> buildDecoderInputs(
            OrtEnvironment env,
            OnnxTensor inputsEmbeds,
            OnnxTensor perLayerInputs,
            int pastLength,
            int stepLength,
            Map<String, OnnxTensor> pastKeyValues,
            Map<String, OnnxTensor> created) throws OrtException {
        long[] mask = new long[pastLength + stepLength];
        java.util.Arrays.fill(mask, 1L);
        long[] positions = new long[stepLength];
        for (int i = 0; i < stepLength; i++) {
            positions[i] = pastLength + i;
        }
        OnnxTensor attentionMask = OnnxTensor.createTensor(env, LongBuffer.wrap(mask), new long[] {1, mask.length});
        created.put("attention_mask", attentionMask);
        OnnxTensor positionIds = OnnxTensor.createTensor(env, LongBuffer.wrap(positions), new long[] {1, stepLength});
        created.put("position_ids", positionIds);

        Map<String, OnnxTensor> inputs = new LinkedHashMap<>();
        inputs.put("inputs_embeds", inputsEmbeds);
        inputs.put("per_layer_inputs", perLayerInputs);
        inputs.put("attention_mask", attentionMask);
        inputs.put("position_ids", positionIds);
        inputs.putAll(pastKeyValues);
        return inputs;
    }

    /** Returns the previous step's present tensor, or an empty [1, heads, 0, head_dim] tensor on the first step. */
    private OnnxTensor pastTensor(OrtSession.Result previous, int layer, String kind, Map<String, OnnxTensor> created)
            throws OrtException {
        if (previous != null) {
            return (OnnxTensor) require(previous, "present." + layer + "." + kind);
        }
        OnnxTensor empty = OnnxTensor.createTensor(env, FloatBuffer.allocate(0),
                new long[] {1, folder.numKeyValueHeads, 0, folder.headDim});
        created.put("past_key_values." + layer + "." + kind, empty);
        return empty;
    }

    /** Checks that the decoder expects a KV cache for exactly the manifest's kv_layers. */
    private void checkDecoderInputs(Set<String> inputNames) {
        List<String> expected = new ArrayList<>();
        for (int layer : folder.kvLayers) {
            expected.add("past_key_values." + layer + ".key");
            expected.add("past_key_values." + layer + ".value");
        }
        for (String name : expected) {
            if (!inputNames.contains(name)) {
                throw new IllegalStateException("decoder_model_merged has no input " + name
                        + " although manifest.json kv_layers lists its layer; inputs are " + inputNames);
            }
        }
        for (String name : inputNames) {
            if (name.startsWith("past_key_values.") && !expected.contains(name)) {
                throw new IllegalStateException("decoder_model_merged input " + name
                        + " belongs to a layer that manifest.json kv_layers does not list");
            }
        }
    }

    /** Greedy sampling: index of the largest logit in row {@code rows - 1} of float32 [1, rows, vocab]. */
    private int argmaxLastRow(OnnxTensor logits, int rows) {
        long[] shape = logits.getInfo().getShape();
        int vocab = (int) shape[shape.length - 1];
        FloatBuffer values = logits.getFloatBuffer();
        int offset = (rows - 1) * vocab;
        int best = 0;
        float bestValue = Float.NEGATIVE_INFINITY;
        for (int i = 0; i < vocab; i++) {
            float value = values.get(offset + i);
            if (value > bestValue) {
                bestValue = value;
                best = i;
            }
        }
        return best;
    }

    private OnnxTensor longTensor(long[] values, long[] shape) throws OrtException {
        return OnnxTensor.createTensor(env, LongBuffer.wrap(values), shape);
    }

    private static Map<String, OnnxTensor> singleInput(String name, OnnxTensor tensor) {
        Map<String, OnnxTensor> inputs = new HashMap<>();
        inputs.put(name, tensor);
        return inputs;
    }

    private static OnnxValue require(OrtSession.Result result, String name) {
        return result.get(name).orElseThrow(() -> new IllegalStateException("ONNX model has no output " + name));
    }

    private static long[] toLongs(List<Integer> ids, int from) {
        long[] out = new long[ids.size() - from];
        for (int i = from; i < ids.size(); i++) {
            out[i - from] = ids.get(i);
        }
        return out;
    }

    private static double rate(int tokens, long nanos) {
        return nanos > 0 ? tokens / (nanos / 1e9) : 0.0;
    }

    @Override
    public void stop() {
        stopRequested = true;
    }

    @Override
    public void close() {
        try {
            if (embedSession != null) {
                embedSession.close();
            }
            if (decoderSession != null) {
                decoderSession.close();
            }
        } catch (OrtException e) {
            android.util.Log.w(MainActivity.TAG, "Closing ONNX Runtime sessions failed", e);
        }
        embedSession = null;
        decoderSession = null;
    }
}
