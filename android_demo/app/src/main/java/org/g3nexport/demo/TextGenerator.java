package org.g3nexport.demo;

import java.io.Closeable;

/** Runtime that turns a chat prompt into streamed text; one implementation per runtime in the export folder. */
interface TextGenerator extends Closeable {
    /** Receives output on the generation thread; the caller moves it to the UI thread. */
    interface Listener {
        void onText(String text);

        /** Reports a one-line summary of speed and memory after a reply. */
        void onStats(String summary);
    }

    /** Loads the program and tokenizer; slow (seconds), so it runs off the UI thread. */
    void load() throws Exception;

    /** Generates a reply to one user message, blocking until EOS, the length limit or {@link #stop()}. */
    void generate(String userMessage, int maxNewTokens, Listener listener) throws Exception;

    /** Asks a running {@link #generate} to return early; safe to call from any thread. */
    void stop();

    @Override
    void close();
}
