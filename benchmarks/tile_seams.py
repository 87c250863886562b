"""Does a tiled decode show its tiles? The shipped brain-ldm-3d, one sample decoded whole and in small tiles.

One seed is denoised (the model's default sampler and steps) and its latent decoded three ways: the whole pass
in fp32 and in the sampling precision, and the exact tiled pass (`napari_meddiff.autoencoder.tiling`) in the sampling
precision with ``--tile`` voxels per side (small, so that tile edges cross the brain many times). Printed: the
largest differences on the model's [0, 1] intensities, tiled against whole in the same precision and each
against fp32 (what that precision's rounding alone gives). Written: ``results/tile_seams.json`` and
``results/tile_seams.png`` (three orthogonal slices of each, and the tiled-whole difference x 20, on one grey
scale): a seam would show as lines every ``--tile`` voxels in the difference.

    python benchmarks/tile_seams.py [--model brain-ldm-3d] [--seed 0] [--tile 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, save  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="brain-ldm-3d")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile", type=int, default=16)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_meddiff import load_model
    from napari_meddiff.autoencoder.passes import decode_latents
    from napari_meddiff.diffusion.loop import denoise
    from napari_meddiff.diffusion.seeds import initial_noise, seeded_generators
    from napari_meddiff.runtime.precision import resolve_precision

    model = load_model(args.model)
    defaults = model.sampling_defaults
    precision = resolve_precision(defaults["precision"], model.device)
    generators = seeded_generators([args.seed], model.device)
    z = denoise(
        model,
        initial_noise(model.sample_shape, generators, model.device),
        sampler=defaults["sampler"],
        steps=int(defaults["steps"]),
        generators=generators,
        precision=precision,
    )

    def decoded(mode: str, prec: str, tile: int | None = None) -> np.ndarray:
        return decode_latents(model, z, prec, mode=mode, tile=tile)[0, 0].clamp(0, 1).numpy()

    whole, tiled, fp32 = decoded("whole", precision), decoded("tiled", precision, args.tile), decoded("whole", "fp32")
    diff = np.abs(tiled - whole)
    result = {
        "machine": machine(),
        "model": model.name,
        "seed": args.seed,
        "precision": precision,
        "tile": args.tile,
        "shape": list(whole.shape),
        "max_abs_tiled_vs_whole": float(diff.max()),
        "max_abs_whole_vs_fp32": float(np.abs(whole - fp32).max()),
        "max_abs_tiled_vs_fp32": float(np.abs(tiled - fp32).max()),
    }
    for key in ("max_abs_tiled_vs_whole", "max_abs_whole_vs_fp32", "max_abs_tiled_vs_fp32"):
        print(f"{key}: {result[key]:.4f}")
    fig, axes = plt.subplots(3, 3, figsize=(10, 10))
    rows = (
        (f"whole, {precision}", whole),
        (f"tiled, {args.tile}-voxel tiles, {precision}", tiled),
        ("|tiled - whole| x 20", np.clip(20 * diff, 0, 1)),
    )
    for r, (name, vol) in enumerate(rows):
        planes = [vol[vol.shape[0] // 2], vol[:, vol.shape[1] // 2], vol[:, :, vol.shape[2] // 2]]
        for c, plane in enumerate(planes):
            axes[r, c].imshow(np.rot90(plane), cmap="gray", vmin=0, vmax=1)
            axes[r, c].axis("off")
        axes[r, 0].set_title(name, loc="left")
    fig.suptitle(
        f"{model.name} seed {args.seed}: max |tiled - whole| {diff.max():.4f} "
        f"(whole {precision} vs fp32: {result['max_abs_whole_vs_fp32']:.4f})"
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "tile_seams.png", dpi=80)
    print(f"wrote {save('tile_seams', result)} and {RESULTS / 'tile_seams.png'}")


if __name__ == "__main__":
    main()
