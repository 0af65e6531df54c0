"""One model family per file (qwen2, lora; later qwen2_audio, qwen2_vl, cnn14)."""
