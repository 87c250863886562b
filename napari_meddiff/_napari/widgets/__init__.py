"""The dock widgets (generate, inpaint, segment, review) and what they share: `controls` (pickers, sampling
and progress rows, the settings form), `conditions` (condition sliders) and `runner` (the worker thread)."""
