package org.g3nexport.demo;

import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Comparator;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * Encoder and decoder for the subset of Hugging Face tokenizer.json that SentencePiece conversions use.
 *
 * <p>ONNX Runtime has no tokenizer, so the ONNX path needs this class. Supported parts:
 * <ul>
 *   <li>model: {@code BPE} (merges as "a b" strings or [a, b] pairs, {@code byte_fallback},
 *       {@code ignore_merges}) and {@code Unigram} (Viterbi search, {@code byte_fallback});</li>
 *   <li>normalizer: null, {@code Replace} with a string pattern, {@code Prepend}, {@code Sequence} of those;</li>
 *   <li>pre_tokenizer: null, {@code Metaspace}, {@code Split} with a string pattern, {@code Sequence} of those;</li>
 *   <li>decoder: {@code Replace}, {@code ByteFallback}, {@code Fuse}, {@code Strip}, {@code Metaspace},
 *       {@code Sequence} of those;</li>
 *   <li>added tokens, matched literally in the raw text before normalization.</li>
 * </ul>
 * Any other component raises IllegalArgumentException naming it, so an unsupported tokenizer fails at load time
 * instead of producing wrong ids. The post_processor is ignored, because the caller adds BOS itself.
 */
final class HfTokenizer {
    private static final String UNIGRAM = "Unigram";
    private static final String BPE = "BPE";
    private static final double UNKNOWN_PENALTY = 10.0;

    private final String modelType;
    private final Map<String, Integer> vocab = new HashMap<>();
    private final List<String> idToToken = new ArrayList<>();
    private final boolean byteFallback;
    private final Integer unknownId;

    private final Map<Long, int[]> merges = new HashMap<>();
    private final boolean ignoreMerges;

    private final List<Double> unigramScores = new ArrayList<>();
    private int maxPieceLength;
    private double unknownScore;

    private final List<String> addedTokens = new ArrayList<>();
    private final Map<Integer, Boolean> addedTokenIsSpecial = new HashMap<>();

    private final List<Map<String, Object>> normalizers;
    private final List<Map<String, Object>> preTokenizers;
    private final List<Map<String, Object>> decoders;

    private HfTokenizer(Map<String, Object> root) {
        Map<String, Object> model = Json.asObject(Json.require(root, "model", "tokenizer.json"), "model");
        modelType = Json.asString(Json.require(model, "type", "model"), "model.type");
        byteFallback = Boolean.TRUE.equals(model.get("byte_fallback"));
        if (BPE.equals(modelType)) {
            loadBpe(model);
            ignoreMerges = Boolean.TRUE.equals(model.get("ignore_merges"));
            Object unk = model.get("unk_token");
            unknownId = unk == null ? null : vocab.get(Json.asString(unk, "model.unk_token"));
        } else if (UNIGRAM.equals(modelType)) {
            loadUnigram(model);
            ignoreMerges = false;
            Object unk = model.get("unk_id");
            unknownId = unk == null ? null : Json.asInt(unk, "model.unk_id");
        } else {
            throw new IllegalArgumentException("Unsupported tokenizer model type \"" + modelType
                    + "\"; this tokenizer supports BPE and Unigram");
        }
        loadAddedTokens(root.get("added_tokens"));
        normalizers = flatten(root.get("normalizer"), "normalizers", "normalizer",
                new String[] {"Replace", "Prepend"});
        preTokenizers = flatten(root.get("pre_tokenizer"), "pretokenizers", "pre_tokenizer",
                new String[] {"Metaspace", "Split"});
        decoders = flatten(root.get("decoder"), "decoders", "decoder",
                new String[] {"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"});
    }

    static HfTokenizer load(File tokenizerJson) throws IOException {
        ExportFolder.requireFile(tokenizerJson);
        try {
            return new HfTokenizer(Json.asObject(Json.parseFile(tokenizerJson), tokenizerJson.toString()));
        } catch (IllegalArgumentException e) {
            throw new IOException("Failed to load " + tokenizerJson + ": " + e.getMessage(), e);
        }
    }

    static HfTokenizer fromJson(String tokenizerJson) {
        return new HfTokenizer(Json.asObject(Json.parse(tokenizerJson), "tokenizer.json"));
    }

    int vocabSize() {
        return idToToken.size();
    }

    /** Encodes text to ids without BOS or EOS. */
    List<Integer> encode(String text) {
        List<Integer> ids = new ArrayList<>();
        int segmentStart = 0;
        int pos = 0;
        while (pos < text.length()) {
            String added = matchAddedToken(text, pos);
            if (added == null) {
                pos++;
                continue;
            }
            encodeSegment(text.substring(segmentStart, pos), segmentStart == 0, ids);
            ids.add(vocab.get(added));
            pos += added.length();
            segmentStart = pos;
        }
        encodeSegment(text.substring(segmentStart), segmentStart == 0, ids);
        return ids;
    }

    /** Decodes ids to text; special added tokens such as {@code <end_of_turn>} are left out, byte tokens kept. */
    String decode(List<Integer> ids) {
        List<String> tokens = new ArrayList<>();
        for (int id : ids) {
            if (id < 0 || id >= idToToken.size() || idToToken.get(id) == null) {
                throw new IllegalArgumentException("Token id " + id + " is outside the tokenizer vocabulary");
            }
            String token = idToToken.get(id);
            // Some conversions list the <0xXX> byte tokens as special added tokens; they still carry text.
            if (Boolean.TRUE.equals(addedTokenIsSpecial.get(id)) && parseByteToken(token) < 0) {
                continue;
            }
            tokens.add(token);
        }
        for (Map<String, Object> decoder : decoders) {
            tokens = applyDecoder(decoder, tokens);
        }
        StringBuilder text = new StringBuilder();
        for (String token : tokens) {
            text.append(token);
        }
        return text.toString();
    }

    // ---- loading ----

    private void putToken(String token, int id) {
        vocab.put(token, id);
        while (idToToken.size() <= id) {
            idToToken.add(null);
        }
        idToToken.set(id, token);
    }

    private void loadBpe(Map<String, Object> model) {
        Map<String, Object> bpeVocab = Json.asObject(Json.require(model, "vocab", "model"), "model.vocab");
        for (Map.Entry<String, Object> entry : bpeVocab.entrySet()) {
            putToken(entry.getKey(), Json.asInt(entry.getValue(), "model.vocab[" + entry.getKey() + "]"));
        }
        List<Object> mergeList = Json.asArray(Json.require(model, "merges", "model"), "model.merges");
        for (int rank = 0; rank < mergeList.size(); rank++) {
            String left;
            String right;
            Object merge = mergeList.get(rank);
            if (merge instanceof String) {
                // Older files write a merge as one string "left right"; a token never contains a plain space
                // because SentencePiece conversions spell the space as U+2581.
                String pair = (String) merge;
                int space = pair.indexOf(' ');
                if (space < 0) {
                    throw new IllegalArgumentException("Invalid merge \"" + pair + "\" at rank " + rank);
                }
                left = pair.substring(0, space);
                right = pair.substring(space + 1);
            } else {
                List<Object> pair = Json.asArray(merge, "model.merges[" + rank + "]");
                left = Json.asString(pair.get(0), "merge left");
                right = Json.asString(pair.get(1), "merge right");
            }
            Integer leftId = vocab.get(left);
            Integer rightId = vocab.get(right);
            Integer mergedId = vocab.get(left + right);
            if (leftId == null || rightId == null || mergedId == null) {
                throw new IllegalArgumentException("Merge \"" + left + " " + right + "\" at rank " + rank
                        + " uses a token that is not in the vocabulary");
            }
            merges.putIfAbsent(pairKey(leftId, rightId), new int[] {rank, mergedId});
        }
    }

    private void loadUnigram(Map<String, Object> model) {
        List<Object> pieces = Json.asArray(Json.require(model, "vocab", "model"), "model.vocab");
        double minScore = Double.MAX_VALUE;
        for (int id = 0; id < pieces.size(); id++) {
            List<Object> piece = Json.asArray(pieces.get(id), "model.vocab[" + id + "]");
            String token = Json.asString(piece.get(0), "piece");
            double score = Json.asDouble(piece.get(1), "score");
            putToken(token, id);
            unigramScores.add(score);
            minScore = Math.min(minScore, score);
            maxPieceLength = Math.max(maxPieceLength, token.length());
        }
        unknownScore = minScore - UNKNOWN_PENALTY;
    }

    private void loadAddedTokens(Object value) {
        if (value == null) {
            return;
        }
        for (Object item : Json.asArray(value, "added_tokens")) {
            Map<String, Object> token = Json.asObject(item, "added_tokens item");
            String content = Json.asString(Json.require(token, "content", "added_tokens item"), "content");
            int id = Json.asInt(Json.require(token, "id", "added_tokens item"), "id");
            putToken(content, id);
            addedTokens.add(content);
            addedTokenIsSpecial.put(id, Boolean.TRUE.equals(token.get("special")));
        }
        // Longest first, so "<start_of_turn>" wins over any shorter added token that is its prefix.
        Collections.sort(addedTokens, new Comparator<String>() {
            @Override
            public int compare(String a, String b) {
                return Integer.compare(b.length(), a.length());
            }
        });
    }

    /** Flattens an optional component or a Sequence of components, rejecting types outside {@code supported}. */
    private static List<Map<String, Object>> flatten(Object value, String listKey, String what, String[] supported) {
        List<Map<String, Object>> out = new ArrayList<>();
        if (value == null) {
            return out;
        }
        Map<String, Object> component = Json.asObject(value, what);
        String type = Json.asString(Json.require(component, "type", what), what + ".type");
        if ("Sequence".equals(type)) {
            for (Object child : Json.asArray(Json.require(component, listKey, what), what + "." + listKey)) {
                out.addAll(flatten(child, listKey, what, supported));
            }
            return out;
        }
        for (String name : supported) {
            if (name.equals(type)) {
                if ("Split".equals(type) || "Replace".equals(type)) {
                    requireStringPattern(component, what + " " + type);
                }
                out.add(component);
                return out;
            }
        }
        throw new IllegalArgumentException("Unsupported " + what + " type \"" + type + "\"");
    }

    private static String requireStringPattern(Map<String, Object> component, String what) {
        Map<String, Object> pattern = Json.asObject(Json.require(component, "pattern", what), what + ".pattern");
        if (!pattern.containsKey("String")) {
            throw new IllegalArgumentException(what + " uses a regex pattern; only string patterns are supported");
        }
        return Json.asString(pattern.get("String"), what + ".pattern.String");
    }

    // ---- encoding ----

    private String matchAddedToken(String text, int pos) {
        for (String token : addedTokens) {
            if (text.startsWith(token, pos)) {
                return token;
            }
        }
        return null;
    }

    private void encodeSegment(String segment, boolean atTextStart, List<Integer> ids) {
        if (segment.isEmpty()) {
            return;
        }
        String normalized = segment;
        for (Map<String, Object> normalizer : normalizers) {
            normalized = applyNormalizer(normalizer, normalized);
        }
        List<String> words = new ArrayList<>();
        words.add(normalized);
        for (Map<String, Object> preTokenizer : preTokenizers) {
            List<String> next = new ArrayList<>();
            for (String word : words) {
                next.addAll(applyPreTokenizer(preTokenizer, word, atTextStart));
            }
            words = next;
        }
        for (String word : words) {
            if (word.isEmpty()) {
                continue;
            }
            if (BPE.equals(modelType)) {
                encodeBpe(word, ids);
            } else {
                encodeUnigram(word, ids);
            }
        }
    }

    private static String applyNormalizer(Map<String, Object> normalizer, String text) {
        String type = (String) normalizer.get("type");
        if ("Replace".equals(type)) {
            String pattern = requireStringPattern(normalizer, "normalizer Replace");
            String content = Json.asString(Json.require(normalizer, "content", "normalizer Replace"), "content");
            return text.replace(pattern, content);
        }
        // Prepend, which HF applies only to non-empty text.
        String prefix = Json.asString(Json.require(normalizer, "prepend", "normalizer Prepend"), "prepend");
        return text.isEmpty() ? text : prefix + text;
    }

    private static List<String> applyPreTokenizer(Map<String, Object> preTokenizer, String word, boolean first) {
        String type = (String) preTokenizer.get("type");
        if ("Metaspace".equals(type)) {
            String replacement = Json.asString(Json.require(preTokenizer, "replacement", "Metaspace"), "replacement");
            Object schemeValue = preTokenizer.get("prepend_scheme");
            String scheme = schemeValue == null ? "always" : Json.asString(schemeValue, "prepend_scheme");
            String replaced = word.replace(" ", replacement);
            boolean prepend = "always".equals(scheme) || ("first".equals(scheme) && first);
            if (prepend && !replaced.startsWith(replacement)) {
                replaced = replacement + replaced;
            }
            boolean split = !Boolean.FALSE.equals(preTokenizer.get("split"));
            return split ? splitKeepingDelimiter(replaced, replacement, "MergedWithNext")
                    : Collections.singletonList(replaced);
        }
        String pattern = requireStringPattern(preTokenizer, "pre_tokenizer Split");
        String behavior = Json.asString(Json.require(preTokenizer, "behavior", "Split"), "Split.behavior");
        if (Boolean.TRUE.equals(preTokenizer.get("invert"))) {
            throw new IllegalArgumentException("pre_tokenizer Split with invert=true is not supported");
        }
        return splitKeepingDelimiter(word, pattern, behavior);
    }

    /** Splits on every occurrence of {@code delimiter}, placing it as HF's SplitDelimiterBehavior defines. */
    private static List<String> splitKeepingDelimiter(String text, String delimiter, String behavior) {
        List<String> pieces = new ArrayList<>();
        StringBuilder current = new StringBuilder();
        int pos = 0;
        while (pos < text.length()) {
            if (!delimiter.isEmpty() && text.startsWith(delimiter, pos)) {
                switch (behavior) {
                    case "Removed":
                        addIfNotEmpty(pieces, current);
                        break;
                    case "Isolated":
                        addIfNotEmpty(pieces, current);
                        pieces.add(delimiter);
                        break;
                    case "MergedWithPrevious":
                        current.append(delimiter);
                        addIfNotEmpty(pieces, current);
                        break;
                    case "MergedWithNext":
                        addIfNotEmpty(pieces, current);
                        current.append(delimiter);
                        break;
                    case "Contiguous":
                        if (current.length() > 0 && !current.toString().endsWith(delimiter)) {
                            addIfNotEmpty(pieces, current);
                        }
                        current.append(delimiter);
                        break;
                    default:
                        throw new IllegalArgumentException("Unsupported Split behavior \"" + behavior + "\"");
                }
                pos += delimiter.length();
            } else {
                if ("Contiguous".equals(behavior) && current.toString().endsWith(delimiter)
                        && current.length() > 0) {
                    addIfNotEmpty(pieces, current);
                }
                current.append(text.charAt(pos));
                pos++;
            }
        }
        addIfNotEmpty(pieces, current);
        return pieces;
    }

    private static void addIfNotEmpty(List<String> pieces, StringBuilder current) {
        if (current.length() > 0) {
            pieces.add(current.toString());
            current.setLength(0);
        }
    }

    private void encodeBpe(String word, List<Integer> ids) {
        Integer whole = vocab.get(word);
        if (ignoreMerges && whole != null) {
            ids.add(whole);
            return;
        }
        List<Integer> symbols = new ArrayList<>();
        int pos = 0;
        while (pos < word.length()) {
            int end = word.offsetByCodePoints(pos, 1);
            appendCharacter(word.substring(pos, end), symbols);
            pos = end;
        }
        // Repeatedly merge the adjacent pair with the lowest merge rank, as HF's BPE does.
        while (symbols.size() > 1) {
            int bestIndex = -1;
            int[] best = null;
            for (int i = 0; i + 1 < symbols.size(); i++) {
                int[] merge = merges.get(pairKey(symbols.get(i), symbols.get(i + 1)));
                if (merge != null && (best == null || merge[0] < best[0])) {
                    best = merge;
                    bestIndex = i;
                }
            }
            if (best == null) {
                break;
            }
            symbols.set(bestIndex, best[1]);
            symbols.remove(bestIndex + 1);
        }
        ids.addAll(symbols);
    }

    /** Adds one character's id, or its UTF-8 byte tokens when the vocabulary lacks it. */
    private void appendCharacter(String character, List<Integer> out) {
        Integer id = vocab.get(character);
        if (id != null) {
            out.add(id);
            return;
        }
        if (byteFallback) {
            List<Integer> byteIds = byteTokenIds(character);
            if (byteIds != null) {
                out.addAll(byteIds);
                return;
            }
        }
        if (unknownId == null) {
            throw new IllegalArgumentException("Character U+" + Integer.toHexString(character.codePointAt(0))
                    + " is not in the vocabulary and the tokenizer has no unknown token");
        }
        out.add(unknownId);
    }

    private List<Integer> byteTokenIds(String text) {
        List<Integer> out = new ArrayList<>();
        for (byte b : text.getBytes(StandardCharsets.UTF_8)) {
            Integer id = vocab.get(String.format("<0x%02X>", b & 0xFF));
            if (id == null) {
                return null;
            }
            out.add(id);
        }
        return out;
    }

    private void encodeUnigram(String word, List<Integer> ids) {
        int length = word.length();
        double[] bestScore = new double[length + 1];
        int[] bestStart = new int[length + 1];
        int[] bestId = new int[length + 1];
        java.util.Arrays.fill(bestScore, Double.NEGATIVE_INFINITY);
        bestScore[0] = 0.0;

        // Viterbi search over code-point boundaries: a piece ending at `end` extends the best path to its start.
        for (int start = 0; start < length; start = word.offsetByCodePoints(start, 1)) {
            if (bestScore[start] == Double.NEGATIVE_INFINITY) {
                continue;
            }
            int charEnd = word.offsetByCodePoints(start, 1);
            boolean singleCharFound = false;
            for (int end = charEnd; end <= length && end - start <= maxPieceLength; ) {
                Integer id = vocab.get(word.substring(start, end));
                if (id != null && id < unigramScores.size()) {
                    double score = bestScore[start] + unigramScores.get(id);
                    if (score > bestScore[end]) {
                        bestScore[end] = score;
                        bestStart[end] = start;
                        bestId[end] = id;
                    }
                    if (end == charEnd) {
                        singleCharFound = true;
                    }
                }
                if (end == length) {
                    break;
                }
                end = word.offsetByCodePoints(end, 1);
            }
            if (!singleCharFound) {
                // An unknown character costs the unknown penalty, so known pieces always win when they cover it.
                double score = bestScore[start] + unknownScore;
                if (score > bestScore[charEnd]) {
                    bestScore[charEnd] = score;
                    bestStart[charEnd] = start;
                    bestId[charEnd] = -1;
                }
            }
        }

        List<Integer> reversed = new ArrayList<>();
        List<String> unknownText = new ArrayList<>();
        for (int end = length; end > 0; end = bestStart[end]) {
            reversed.add(bestId[end]);
            unknownText.add(word.substring(bestStart[end], end));
        }
        for (int i = reversed.size() - 1; i >= 0; i--) {
            int id = reversed.get(i);
            if (id >= 0) {
                ids.add(id);
            } else {
                appendCharacter(unknownText.get(i), ids);
            }
        }
    }

    private static long pairKey(int left, int right) {
        return ((long) left << 32) | (right & 0xFFFFFFFFL);
    }

    // ---- decoding ----

    private static List<String> applyDecoder(Map<String, Object> decoder, List<String> tokens) {
        String type = (String) decoder.get("type");
        List<String> out = new ArrayList<>();
        switch (type) {
            case "Replace": {
                String pattern = requireStringPattern(decoder, "decoder Replace");
                String content = Json.asString(Json.require(decoder, "content", "decoder Replace"), "content");
                for (String token : tokens) {
                    out.add(token.replace(pattern, content));
                }
                return out;
            }
            case "ByteFallback":
                return joinByteTokens(tokens);
            case "Fuse": {
                StringBuilder fused = new StringBuilder();
                for (String token : tokens) {
                    fused.append(token);
                }
                out.add(fused.toString());
                return out;
            }
            case "Strip": {
                String content = Json.asString(Json.require(decoder, "content", "decoder Strip"), "content");
                int start = Json.asInt(Json.require(decoder, "start", "decoder Strip"), "start");
                int stop = Json.asInt(Json.require(decoder, "stop", "decoder Strip"), "stop");
                for (String token : tokens) {
                    out.add(strip(token, content, start, stop));
                }
                return out;
            }
            default: {
                // Metaspace: the replacement character becomes a space, and the space added at the start of the
                // text is removed again unless prepend_scheme is "never".
                String replacement = Json.asString(Json.require(decoder, "replacement", "decoder Metaspace"),
                        "replacement");
                Object schemeValue = decoder.get("prepend_scheme");
                boolean removeLeading = schemeValue == null || !"never".equals(schemeValue);
                for (int i = 0; i < tokens.size(); i++) {
                    String token = tokens.get(i).replace(replacement, " ");
                    if (i == 0 && removeLeading && token.startsWith(" ")) {
                        token = token.substring(1);
                    }
                    out.add(token);
                }
                return out;
            }
        }
    }

    private static String strip(String token, String content, int start, int stop) {
        int begin = 0;
        int end = token.length();
        for (int i = 0; i < start && token.startsWith(content, begin); i++) {
            begin += content.length();
        }
        for (int i = 0; i < stop && end - content.length() >= begin && token.startsWith(content, end - content.length()); i++) {
            end -= content.length();
        }
        return token.substring(begin, end);
    }

    /**
     * Replaces each run of byte tokens such as {@code <0xE2><0x96><0x81>} by the text that its bytes decode to.
     * A run that is not valid UTF-8 decodes to U+FFFD characters, as in HF.
     */
    private static List<String> joinByteTokens(List<String> tokens) {
        List<String> out = new ArrayList<>();
        ByteArrayOutputStream pending = new ByteArrayOutputStream();
        int pendingCount = 0;
        for (String token : tokens) {
            int value = parseByteToken(token);
            if (value >= 0) {
                pending.write(value);
                pendingCount++;
                continue;
            }
            flushBytes(pending, pendingCount, out);
            pendingCount = 0;
            out.add(token);
        }
        flushBytes(pending, pendingCount, out);
        return out;
    }

    private static void flushBytes(ByteArrayOutputStream pending, int count, List<String> out) {
        if (count == 0) {
            return;
        }
        byte[] bytes = pending.toByteArray();
        pending.reset();
        String text = new String(bytes, StandardCharsets.UTF_8);
        if (text.indexOf('\uFFFD') >= 0) {
            // HF emits one U+FFFD per byte token when the run is not valid UTF-8.
            StringBuilder replacement = new StringBuilder();
            for (int i = 0; i < count; i++) {
                replacement.append('\uFFFD');
            }
            text = replacement.toString();
        }
        out.add(text);
    }

    private static int parseByteToken(String token) {
        if (token.length() != 6 || !token.startsWith("<0x") || token.charAt(5) != '>') {
            return -1;
        }
        try {
            return Integer.parseInt(token.substring(3, 5), 16);
        } catch (NumberFormatException e) {
            return -1;
        }
    }
}
