"""Where trials run: local child processes (one per trial)."""
