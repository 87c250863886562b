"""Dock widgets; `common` holds the parts they share (pickers, progress row, worker plumbing)."""
