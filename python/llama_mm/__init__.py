"""llama_mm: a native runtime for Llama 3.2 Vision (Mllama) checkpoints."""
