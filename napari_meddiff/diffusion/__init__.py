"""The denoising loop shared by every task (`loop.denoise`), its samplers, conditioning inputs and seeds
(where the noise is drawn: `seeds.initial_noise`)."""
