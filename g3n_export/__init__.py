"""g3n-export: slice, quantize and export Google's Gemma 3n for on-device runtimes."""

__version__ = "0.1.0"
