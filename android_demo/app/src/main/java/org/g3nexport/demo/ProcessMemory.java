package org.g3nexport.demo;

import android.os.Debug;

/** Memory of this app process as the phone sees it. */
class ProcessMemory {
    /**
     * Returns the proportional set size in MiB: resident pages of the heap, native allocations and the
     * memory-mapped model files, with shared pages split between the processes that map them.
     */
    long pssMiB() {
        // Debug.getPss() reports KiB.
        return Debug.getPss() / 1024;
    }
}
