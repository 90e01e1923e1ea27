"""Focus-N-Fix: DRaFT-K fine-tuning with a regional constraint (issue 8; the trainer is being written)."""
