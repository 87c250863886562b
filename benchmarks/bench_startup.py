"""Start-up: wall seconds of short commands, each a fresh process, against the imports they cannot avoid.

    python benchmarks/bench_startup.py [--repeat 5]

Rows (median of ``--repeat`` fresh processes each):
- ``python``: the interpreter alone (the floor);
- ``import torch``, ``import monai.networks.nets``: what a command that runs a network must import
  (``monai.networks`` imports ``monai`` whole: apps, data, transforms and their optional dependencies);
- ``lean import monai.networks.nets``: the same through `napari_meddiff.runtime.lean_imports` (MONAI without matplotlib,
  pandas, scikit-learn and scipy.signal), as the model-running commands import it;
- ``meddiff --help``, ``meddiff models``: commands that read no weights (they import neither);
- ``meddiff generate --num 1``: the shipped default model, seed 0, written to a temporary folder; and the same
  with ``MEDDIFF_LEAN_IMPORTS=0`` (the plain import, the baseline of this run).

Prints each row, its ratio to ``import monai.networks.nets`` and the other cores' load while it ran (a busy
machine inflates every row); writes ``benchmarks/results/startup.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, others_cpu_use, save, table  # noqa: E402

BIN = Path(sys.executable).parent


def wall(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    meddiff = [sys.executable, "-m", "napari_meddiff.cli"]
    out = Path(tempfile.mkdtemp(prefix="meddiff-startup-"))
    lean = (
        "from napari_meddiff.runtime.lean_imports import import_monai_lean; import_monai_lean(); "
        "import monai.networks.nets"
    )
    plain = {"MEDDIFF_LEAN_IMPORTS": "0"}
    commands = {  # name: (command, extra environment); None: generate, a new output folder each run
        "python": ([sys.executable, "-c", "pass"], {}),
        "import torch": ([sys.executable, "-c", "import torch"], {}),
        "import monai.networks.nets": ([sys.executable, "-c", "import monai.networks.nets"], {}),
        "lean import monai.networks.nets": ([sys.executable, "-c", lean], {}),
        "meddiff --help": ([*meddiff, "--help"], {}),
        "meddiff models": ([*meddiff, "models"], {}),
        "meddiff generate --num 1": (None, {}),
        "meddiff generate --num 1 (MEDDIFF_LEAN_IMPORTS=0)": (None, plain),
    }
    for cmd, extra in commands.values():  # warm the file cache (the first process after a boot reads from disk)
        if cmd is not None:
            wall(cmd, {**env, **extra})
    rows = []
    for name, (cmd, extra) in commands.items():
        times = []
        load = others_cpu_use(1.0)
        for i in range(args.repeat):
            run = cmd or [*meddiff, "generate", "--num", "1", "--seed", "0", "--out", str(out / f"{len(rows)}-{i}")]
            times.append(wall(run, {**env, **extra}))
        rows.append(
            {
                "command": name,
                "median_s": round(statistics.median(times), 3),
                "min_s": round(min(times), 3),
                "others_cores_busy": None if load is None else round(load, 2),
            }
        )
    ref = next(r["median_s"] for r in rows if r["command"] == "import monai.networks.nets")
    for r in rows:
        r["vs_import_monai_networks"] = round(r["median_s"] / ref, 2)
    print(table(rows, ["command", "median_s", "min_s", "vs_import_monai_networks", "others_cores_busy"]))
    save("startup", {"machine": machine(), "repeat": args.repeat, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
