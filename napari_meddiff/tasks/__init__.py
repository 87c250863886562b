"""What a user asks for: generate, inpaint, segment, and batches of generated volumes (sharded or not).

Each task checks its inputs, resolves its settings (`settings`), prepares the model, runs the one
denoising loop and records provenance."""
