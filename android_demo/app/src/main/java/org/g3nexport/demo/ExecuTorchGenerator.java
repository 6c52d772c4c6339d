package org.g3nexport.demo;

import java.util.Locale;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;

import org.pytorch.executorch.extension.llm.LlmCallback;
import org.pytorch.executorch.extension.llm.LlmModule;

/**
 * Runs executorch/model.pte through ExecuTorch's {@code LlmModule}, with executorch/ple.ptd as its data file.
 *
 * <p>Written against the executorch-android 1.3 Java API: {@code generate} and {@code load} return nothing and
 * throw {@code ExecutorchRuntimeException} on failure, and errors also reach {@link LlmCallback#onError}.
 */
final class ExecuTorchGenerator implements TextGenerator {
    private final ExportFolder folder;
    private final ProcessMemory memory;
    private LlmModule module;

    ExecuTorchGenerator(ExportFolder folder, ProcessMemory memory) {
        this.folder = folder;
        this.memory = memory;
    }

    @Override
    public void load() throws Exception {
        String program = ExportFolder.requireFile(folder.executorchProgram()).getAbsolutePath();
        String tokenizer = ExportFolder.requireFile(folder.executorchTokenizer()).getAbsolutePath();
        String data = ExportFolder.requireFile(folder.executorchData()).getAbsolutePath();

        // The JNI runner takes the BOS count from the constructor, not from generate(), and its default is 0.
        // One BOS matches the generation loop of the export folder contract. The runner takes the BOS id from
        // tokenizer.json, so it equals manifest.json's bos_token_id only when the tokenizer agrees with it.
        // Temperature 0 selects greedy decoding, the same as the ONNX path.
        module = new LlmModule(LlmModule.MODEL_TYPE_TEXT, program, tokenizer, 0.0f, data, 1, 0);
        module.load();
    }

    @Override
    public void generate(String userMessage, int maxNewTokens, final Listener listener) {
        if (module == null) {
            throw new IllegalStateException("ExecuTorch model is not loaded; call load() first");
        }
        // Each message is a fresh single-turn chat, so the runner restarts at position 0 and adds BOS again.
        module.resetContext();

        final AtomicInteger pieces = new AtomicInteger();
        final int pieceLimit = maxNewTokens;
        LlmCallback callback = new LlmCallback() {
            @Override
            public void onResult(String text) {
                listener.onText(text);
                // NOTE: the runner sends one string per complete UTF-8 sequence, which is usually one token, so
                // this limit counts strings and may let a few extra tokens through. seqLen below is the hard limit.
                if (pieces.incrementAndGet() >= pieceLimit) {
                    module.stop();
                }
            }

            @Override
            public void onStats(String statsJson) {
                listener.onStats(summarizeStats(statsJson, memory));
            }

            @Override
            public void onError(int errorCode, String message) {
                listener.onText("\n[ExecuTorch error " + errorCode + ": " + message + "]\n");
            }
        };
        // The program takes calls shorter than its KV cache (get_max_seq_len < get_max_context_len), and for such
        // programs ExecuTorch's runner reads seqLen as a budget of new tokens, not of prompt plus new tokens. So the
        // hard limit is the new-token limit. If the prompt leaves less room than that, generation ends with the
        // runner's error, because the program rejects positions past its cache. The runner also stops at the
        // tokenizer's EOS id and at any id that the program's get_eos_ids method returns.
        module.generate(ChatFormat.singleTurnPrompt(userMessage), Math.min(maxNewTokens, folder.maxSeqLen), callback,
                false);
    }

    @Override
    public void stop() {
        if (module != null) {
            module.stop();
        }
    }

    @Override
    public void close() {
        if (module != null) {
            module.close();
            module = null;
        }
    }

    /**
     * Formats the runner's stats JSON (keys as written by ExecuTorch's stats_to_json_string) as one line.
     * The runner reports no CPU memory, so the line adds the process PSS that {@link ProcessMemory} measures.
     */
    static String summarizeStats(String statsJson, ProcessMemory memory) {
        Map<String, Object> stats;
        try {
            stats = Json.asObject(Json.parse(statsJson), "ExecuTorch stats");
        } catch (IllegalArgumentException e) {
            return "stats: " + statsJson;
        }
        long promptTokens = longField(stats, "prompt_tokens");
        long generatedTokens = longField(stats, "generated_tokens");
        long inferenceStart = longField(stats, "inference_start_ms");
        long promptEvalEnd = longField(stats, "prompt_eval_end_ms");
        long inferenceEnd = longField(stats, "inference_end_ms");
        long loadMs = longField(stats, "model_load_end_ms") - longField(stats, "model_load_start_ms");

        double prefillSeconds = (promptEvalEnd - inferenceStart) / 1000.0;
        double decodeSeconds = (inferenceEnd - promptEvalEnd) / 1000.0;
        return String.format(Locale.US,
                "ExecuTorch: prefill %d tok at %.1f tok/s, decode %d tok at %.1f tok/s, load %d ms, PSS %d MiB",
                promptTokens, rate(promptTokens, prefillSeconds),
                generatedTokens, rate(generatedTokens, decodeSeconds),
                loadMs, memory.pssMiB());
    }

    private static double rate(long tokens, double seconds) {
        return seconds > 0 ? tokens / seconds : 0.0;
    }

    private static long longField(Map<String, Object> stats, String key) {
        Object value = stats.get(key);
        return value instanceof Number ? ((Number) value).longValue() : 0L;
    }
}
