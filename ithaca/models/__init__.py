"""Model families: sp plans, attention adapters, denoising loops, registry."""
