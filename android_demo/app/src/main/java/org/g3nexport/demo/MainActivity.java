package org.g3nexport.demo;

import android.app.Activity;
import android.os.Bundle;
import android.util.Log;
import android.view.View;
import android.widget.Button;
import android.widget.EditText;
import android.widget.RadioGroup;
import android.widget.ScrollView;
import android.widget.TextView;

import java.io.File;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;

/** Chat screen: pick an export folder and a runtime, load it, then send messages and watch tokens stream in. */
public class MainActivity extends Activity {
    static final String TAG = "G3nDemo";
    private static final int MAX_NEW_TOKENS = 256;

    // One worker thread, so loading and generation never overlap and the UI thread never blocks on the model.
    private final ExecutorService worker = Executors.newSingleThreadExecutor();
    private final ProcessMemory memory = new ProcessMemory();
    private TextGenerator generator;

    private EditText folderInput;
    private RadioGroup runtimeGroup;
    private EditText promptInput;
    private Button loadButton;
    private Button sendButton;
    private Button stopButton;
    private TextView transcript;
    private TextView statsView;
    private ScrollView transcriptScroll;

    @Override
    protected void onCreate(Bundle savedInstanceState) {
        super.onCreate(savedInstanceState);
        setContentView(R.layout.activity_main);
        folderInput = (EditText) findViewById(R.id.folder_input);
        runtimeGroup = (RadioGroup) findViewById(R.id.runtime_group);
        promptInput = (EditText) findViewById(R.id.prompt_input);
        loadButton = (Button) findViewById(R.id.load_button);
        sendButton = (Button) findViewById(R.id.send_button);
        stopButton = (Button) findViewById(R.id.stop_button);
        transcript = (TextView) findViewById(R.id.transcript);
        statsView = (TextView) findViewById(R.id.stats);
        transcriptScroll = (ScrollView) findViewById(R.id.transcript_scroll);

        folderInput.setText(ExportFolder.DEVICE_ROOT + "/gemma3n");
        setBusy(false, false);
        loadButton.setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View view) {
                loadModel();
            }
        });
        sendButton.setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View view) {
                sendPrompt();
            }
        });
        stopButton.setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View view) {
                TextGenerator current = generator;
                if (current != null) {
                    current.stop();
                }
            }
        });
    }

    private void loadModel() {
        final File root = new File(folderInput.getText().toString().trim());
        final boolean useOnnx = runtimeGroup.getCheckedRadioButtonId() == R.id.runtime_onnx;
        setBusy(true, false);
        statsView.setText(R.string.status_loading);
        worker.execute(new Runnable() {
            @Override
            public void run() {
                closeGenerator();
                try {
                    ExportFolder folder = ExportFolder.open(root);
                    TextGenerator loaded = useOnnx
                            ? new OnnxGenerator(folder, memory)
                            : new ExecuTorchGenerator(folder, memory);
                    long start = System.nanoTime();
                    loaded.load();
                    long loadMs = (System.nanoTime() - start) / 1_000_000;
                    generator = loaded;
                    showStatus(getString(R.string.status_loaded, root.getName(), loadMs, memory.pssMiB()), true);
                } catch (Exception | LinkageError e) {
                    // LinkageError covers a missing native library, which a wrong ABI or a stripped APK causes.
                    Log.e(TAG, "Loading " + root + " failed", e);
                    showStatus(getString(R.string.status_load_failed, String.valueOf(e.getMessage())), false);
                }
            }
        });
    }

    private void sendPrompt() {
        final String message = promptInput.getText().toString().trim();
        final TextGenerator current = generator;
        if (message.isEmpty() || current == null) {
            return;
        }
        promptInput.setText("");
        appendTranscript("\n> " + message + "\n");
        setBusy(true, true);
        worker.execute(new Runnable() {
            @Override
            public void run() {
                try {
                    current.generate(message, MAX_NEW_TOKENS, new TextGenerator.Listener() {
                        @Override
                        public void onText(String text) {
                            appendTranscript(text);
                        }

                        @Override
                        public void onStats(final String summary) {
                            runOnUiThread(new Runnable() {
                                @Override
                                public void run() {
                                    statsView.setText(summary);
                                }
                            });
                        }
                    });
                    showStatus(null, true);
                } catch (Exception e) {
                    Log.e(TAG, "Generation failed", e);
                    showStatus(getString(R.string.status_generate_failed, String.valueOf(e.getMessage())), true);
                }
            }
        });
    }

    private void appendTranscript(final String text) {
        runOnUiThread(new Runnable() {
            @Override
            public void run() {
                transcript.append(text);
                transcriptScroll.post(new Runnable() {
                    @Override
                    public void run() {
                        transcriptScroll.fullScroll(View.FOCUS_DOWN);
                    }
                });
            }
        });
    }

    /** Shows {@code status} (when not null) and re-enables the controls for the loaded state. */
    private void showStatus(final String status, final boolean loaded) {
        runOnUiThread(new Runnable() {
            @Override
            public void run() {
                if (status != null) {
                    statsView.setText(status);
                }
                loadButton.setEnabled(true);
                sendButton.setEnabled(loaded);
                stopButton.setEnabled(false);
            }
        });
    }

    private void setBusy(boolean busy, boolean generating) {
        loadButton.setEnabled(!busy);
        sendButton.setEnabled(!busy && generator != null);
        stopButton.setEnabled(generating);
    }

    private void closeGenerator() {
        TextGenerator old = generator;
        generator = null;
        if (old != null) {
            old.close();
        }
    }

    @Override
    protected void onDestroy() {
        TextGenerator current = generator;
        if (current != null) {
            current.stop();
        }
        worker.execute(new Runnable() {
            @Override
            public void run() {
                closeGenerator();
            }
        });
        worker.shutdown();
        super.onDestroy();
    }
}
