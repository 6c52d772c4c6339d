package org.g3nexport.demo;

import java.io.File;
import java.io.IOException;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;

/**
 * Folder written by {@code g3n-export --target android} and the runtime fields of its manifest.json.
 *
 * <p>File names follow the export folder contract: {@code executorch/model.pte}, {@code executorch/ple.ptd},
 * {@code executorch/tokenizer.json}, {@code onnx/embed_tokens.{ort,onnx}},
 * {@code onnx/decoder_model_merged.{ort,onnx}} and {@code onnx/tokenizer.json}.
 */
final class ExportFolder {
    /** Parent folder that push_model.sh copies exports into, one subfolder per export name. */
    static final String DEVICE_ROOT = "/data/local/tmp/g3n";

    final File root;
    final int vocabSize;
    final int hiddenSize;
    final int numHiddenLayers;
    final int hiddenSizePerLayerInput;
    final int numKeyValueHeads;
    final int headDim;
    /** Decoder layers that own a KV cache, in order; KV-shared layers own none. */
    final List<Integer> kvLayers;
    final int bosTokenId;
    final List<Integer> eosTokenIds;
    final int maxSeqLen;

    private ExportFolder(File root, Map<String, Object> model) {
        this.root = root;
        String where = new File(root, "manifest.json") + " \"model\"";
        vocabSize = Json.asInt(Json.require(model, "vocab_size", where), "vocab_size");
        hiddenSize = Json.asInt(Json.require(model, "hidden_size", where), "hidden_size");
        numHiddenLayers = Json.asInt(Json.require(model, "num_hidden_layers", where), "num_hidden_layers");
        hiddenSizePerLayerInput = Json.asInt(
                Json.require(model, "hidden_size_per_layer_input", where), "hidden_size_per_layer_input");
        numKeyValueHeads = Json.asInt(Json.require(model, "num_key_value_heads", where), "num_key_value_heads");
        headDim = Json.asInt(Json.require(model, "head_dim", where), "head_dim");
        kvLayers = readIntList(Json.require(model, "kv_layers", where), "kv_layers");
        bosTokenId = Json.asInt(Json.require(model, "bos_token_id", where), "bos_token_id");
        eosTokenIds = readIntList(Json.require(model, "eos_token_ids", where), "eos_token_ids");
        maxSeqLen = Json.asInt(Json.require(model, "max_seq_len", where), "max_seq_len");
    }

    /** Reads manifest.json from {@code root}; throws IOException naming the file when it is missing or invalid. */
    static ExportFolder open(File root) throws IOException {
        File manifestFile = new File(root, "manifest.json");
        if (!manifestFile.isFile()) {
            throw new IOException("manifest.json not found in " + root
                    + ". Push an export folder with android_demo/push_model.sh first.");
        }
        Map<String, Object> manifest = Json.asObject(Json.parseFile(manifestFile), manifestFile.toString());
        Object model = Json.require(manifest, "model", manifestFile.toString());
        try {
            return new ExportFolder(root, Json.asObject(model, "\"model\""));
        } catch (IllegalArgumentException e) {
            throw new IOException("Invalid " + manifestFile + ": " + e.getMessage(), e);
        }
    }

    File executorchProgram() {
        return new File(root, "executorch/model.pte");
    }

    File executorchData() {
        return new File(root, "executorch/ple.ptd");
    }

    File executorchTokenizer() {
        return new File(root, "executorch/tokenizer.json");
    }

    File onnxTokenizer() {
        return new File(root, "onnx/tokenizer.json");
    }

    /** Returns the ORT-format file when the export has one, because it loads faster than the .onnx file. */
    File onnxModel(String baseName) {
        File ortFormat = new File(root, "onnx/" + baseName + ".ort");
        return ortFormat.isFile() ? ortFormat : new File(root, "onnx/" + baseName + ".onnx");
    }

    boolean isEos(int tokenId) {
        return eosTokenIds.contains(tokenId);
    }

    static File requireFile(File file) throws IOException {
        if (!file.isFile()) {
            throw new IOException("Export file not found: " + file
                    + ". Check that the export was made with --target android and pushed completely.");
        }
        return file;
    }

    private static List<Integer> readIntList(Object value, String what) {
        List<Integer> out = new ArrayList<>();
        for (Object item : Json.asArray(value, what)) {
            out.add(Json.asInt(item, what + " item"));
        }
        return Collections.unmodifiableList(out);
    }
}
