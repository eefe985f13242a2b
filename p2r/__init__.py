"""p2r: process-aware video reasoning training (VideoP2R)."""
