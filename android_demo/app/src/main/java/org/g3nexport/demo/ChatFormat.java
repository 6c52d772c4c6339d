package org.g3nexport.demo;

/** Gemma's chat turn format, shared by both runtimes so they see the same prompt text. */
final class ChatFormat {
    private ChatFormat() {
    }

    /**
     * Wraps one user message as a single-turn Gemma prompt that ends where the model's reply starts.
     * BOS is not part of the text: each runtime adds the manifest's bos_token_id itself.
     */
    static String singleTurnPrompt(String userMessage) {
        return "<start_of_turn>user\n" + userMessage + "<end_of_turn>\n<start_of_turn>model\n";
    }
}
