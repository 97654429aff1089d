"""Softmax attention blocks: causal MHA / GQA / MQA attention and latent attention (MLA)."""
