"""Priors: text -> CLIP image embedding (Karlo v1.0-alpha for Stable unCLIP-L text-to-image)."""
