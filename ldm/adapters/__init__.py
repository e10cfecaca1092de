"""Files that change a loaded model: LoRA weights, textual-inversion embeddings, a replacement VAE."""
