"""Can a map generator give back a map? A held-out subject's tissue map is noised to timestep t and the model's
clean-map estimate compared with it (issue 39): near t = 0 the input nearly is the answer, so a low Dice there is
a capacity limit of the network, not a lack of training.

    python benchmarks/map_identity.py                                   # the shipped brain-tissue-maps-3d
    python benchmarks/map_identity.py --checkpoint runs/maps2/diffusion.pt   # a run's EMA in that architecture

Prints, for each t, the mean squared error of the one-hot estimate and the Dice of its argmax per tissue.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from monai.networks.schedulers import DDPMScheduler

    from napari_meddiff.diffusion.conditioning import network_conditions, unet_inputs
    from napari_meddiff.io.volume import read_volume
    from napari_meddiff.models import load_model
    from napari_meddiff.training.checkpoints import load_checkpoint
    from napari_meddiff.training.diffusion import onehot_pm1

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="brain-tissue-maps-3d")
    p.add_argument("--checkpoint", type=Path, default=None, help="a training checkpoint whose EMA to use")
    p.add_argument("--map", type=Path, default=REPO / "data/cohort-2mm-heldout/sub-100000_dseg.nii.gz")
    p.add_argument("--t", default="999,300,30")
    args = p.parse_args(argv)
    model = load_model(args.model, device="cpu")
    if args.checkpoint is not None:
        state = load_checkpoint(args.checkpoint)
        model.unet.load_state_dict(state["ema"])
        print(f"{args.checkpoint}: step {state.get('step')} (EMA)")
    model.unet.eval()
    real = np.asarray(read_volume(args.map).array).astype(np.int64)
    want = np.array(model.image_shape)  # centre crop / pad to the model grid
    start = np.maximum((np.array(real.shape) - want) // 2, 0)
    real = real[tuple(slice(s, s + w) for s, w in zip(start, want))]
    real = np.pad(real, [(0, w - n) for w, n in zip(want, real.shape)])
    x0 = onehot_pm1(torch.from_numpy(real)[None], len(model.label_output))
    sc = model.config["scheduler"]
    ddpm = DDPMScheduler(
        num_train_timesteps=int(sc["num_train_timesteps"]), schedule=sc["schedule"], beta_start=sc["beta_start"],
        beta_end=sc["beta_end"], prediction_type="sample", clip_sample=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    defaults = torch.tensor([[c.default for c in model.conditions]], dtype=torch.float32)
    names = model.label_output
    with torch.inference_mode():
        for t in (int(v) for v in args.t.split(",")):
            xt = ddpm.add_noise(x0, torch.randn(x0.shape, generator=gen), torch.tensor([t]))
            net_in, kwargs = unet_inputs(xt, network_conditions(model.conditioning, defaults, xt))
            est = model.unet(net_in, timesteps=torch.tensor([t]), **kwargs)
            got = est.argmax(1)[0].numpy()
            dice = {
                names[k]: 2 * np.sum((got == k) & (real == k)) / max(1, np.sum(got == k) + np.sum(real == k))
                for k in names
                if k and np.any(real == k)
            }
            mse = float(((est - x0) ** 2).mean())
            print(f"t={t}: mse {mse:.3f}, Dice " + ", ".join(f"{n} {d:.2f}" for n, d in dice.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
