"""One model family per file: qwen2 (the LM), qwen2_audio, qwen2_vl, cnn14 (the switch's backbone), lora."""
