#!/usr/bin/env bash
# Push a `g3n-export --target android` folder to the device folder that the demo app reads.
#
# Usage: android_demo/push_model.sh EXPORT_DIR [NAME]
#   EXPORT_DIR  folder written by g3n-export (it contains manifest.json)
#   NAME        subfolder name on the device (default: gemma3n); the app opens /data/local/tmp/g3n/NAME
# Set ANDROID_SERIAL to pick a device when more than one is connected.
set -euo pipefail

DEVICE_ROOT=/data/local/tmp/g3n

usage() {
    echo "Usage: $0 EXPORT_DIR [NAME]" >&2
    echo "Pushes EXPORT_DIR to $DEVICE_ROOT/NAME on the connected device (NAME defaults to gemma3n)." >&2
}

if [[ $# -lt 1 || $# -gt 2 ]]; then
    usage
    exit 2
fi

export_dir=${1%/}
name=${2:-gemma3n}

if [[ ! "$name" =~ ^[A-Za-z0-9._-]+$ ]]; then
    echo "error: invalid NAME '$name'; use letters, digits, '.', '_' or '-'" >&2
    exit 2
fi
if [[ ! -d "$export_dir" ]]; then
    echo "error: export folder not found: $export_dir" >&2
    exit 1
fi
if [[ ! -f "$export_dir/manifest.json" ]]; then
    echo "error: $export_dir has no manifest.json, so it is not a g3n-export output folder." >&2
    echo "Pass the folder that g3n-export --size e2b --target android wrote." >&2
    exit 1
fi

missing=0
for required in executorch/model.pte executorch/ple.ptd executorch/tokenizer.json; do
    if [[ ! -f "$export_dir/$required" ]]; then
        echo "error: $export_dir/$required not found; the ExecuTorch path needs it" >&2
        missing=1
    fi
done
if [[ $missing -ne 0 ]]; then
    exit 1
fi
if [[ ! -d "$export_dir/onnx" ]]; then
    echo "warning: $export_dir/onnx not found; only the ExecuTorch path will work" >&2
fi

if ! command -v adb >/dev/null 2>&1; then
    echo "error: adb not found on PATH; install Android SDK platform-tools" >&2
    exit 1
fi
if ! adb get-state >/dev/null 2>&1; then
    echo "error: no device available to adb; connect one with USB debugging on, or set ANDROID_SERIAL" >&2
    adb devices >&2 || true
    exit 1
fi

target="$DEVICE_ROOT/$name"
echo "Pushing $export_dir to $target ($(du -sh "$export_dir" | cut -f1))"
adb shell "rm -rf '$target' && mkdir -p '$target'"
# Push the folder's contents, not the folder itself, so the layout on the device matches EXPORT_DIR.
for entry in "$export_dir"/*; do
    adb push "$entry" "$target/"
done
# The app runs as its own user, so it needs read access to the files and search access to the folders.
adb shell "chmod -R a+rX '$DEVICE_ROOT'"

if ! adb shell "test -f '$target/manifest.json'"; then
    echo "error: $target/manifest.json is missing on the device after the push" >&2
    exit 1
fi
echo "Done. In the app, load: $target"
