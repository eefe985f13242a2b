"""Reusable Lightning callbacks for video RL (never imports p2r)."""
