"""Sharing the cores: seconds per volume of ``meddiff generate`` alone, beside a busy process, and two side by side.

Each setting of ``MEDDIFF_THREADS`` (``torch``: PyTorch's own thread count and spinning OpenMP threads, as before
issue 15; ``auto``: OpenMP threads sleep at barriers and the CLI takes the cores others leave idle) runs
``meddiff generate --num N`` (default model and settings) in three situations; per-volume seconds come from the
sidecars. Issue 15's targets: <= 2.5x per volume beside one busy process, no volume over 3x the median.

    python benchmarks/bench_sharing.py [--num 6] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, others_cpu_use, save, table  # noqa: E402

BUSY = [sys.executable, "-c", "while True: pass"]


def _generate(out: Path, num: int, seed: int, setting: str) -> subprocess.Popen:
    env = {**os.environ, "MEDDIFF_THREADS": setting}
    cmd = [
        sys.executable,
        "-m",
        "napari_meddiff.cli",
        "generate",
        "--num",
        str(num),
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _seconds(out: Path) -> list[float]:
    values = []
    for sidecar in sorted(out.glob("*_seed*.json")):
        meta = json.loads(sidecar.read_text())
        seconds = meta.get("seconds", meta.get("provenance", {}).get("seconds"))
        if seconds is not None:
            values.append(float(seconds))
    return values


def run(situation: str, setting: str, num: int, tmp: Path) -> dict:
    busy = subprocess.Popen(BUSY) if situation == "beside a busy process" else None
    runs = 2 if situation == "two side by side" else 1
    outs = [tmp / f"{setting}-{situation.replace(' ', '_')}-{i}-{time.monotonic_ns()}" for i in range(runs)]
    try:
        time.sleep(0.5 if busy else 0)
        t0 = time.perf_counter()
        procs = [_generate(out, num, 100 * i, setting) for i, out in enumerate(outs)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(err)
        wall = time.perf_counter() - t0
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    seconds = [s for out in outs for s in _seconds(out)]
    median = statistics.median(seconds)
    return {
        "setting": setting,
        "situation": situation,
        "wall_s": round(wall, 2),
        "median_volume_s": round(median, 3),
        "max_volume_s": round(max(seconds), 3),
        "max_over_median": round(max(seconds) / median, 2),
        "volumes": len(seconds),
        "per_volume_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    payload = {"machine": machine(), "others_busy_cores_at_start": others_cpu_use(), "rows": []}
    situations = ("alone", "beside a busy process", "two side by side")
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):  # settings interleaved, so the machine's other load hits both alike
            for situation in situations:
                for setting in ("torch", "auto"):
                    payload["rows"].append(run(situation, setting, args.num, Path(tmp)))
                    print(
                        table(
                            payload["rows"][-1:],
                            ["setting", "situation", "wall_s", "median_volume_s", "max_volume_s", "max_over_median"],
                        ),
                        flush=True,
                    )
    summary = []
    for setting in ("torch", "auto"):
        alone = statistics.median(
            r["median_volume_s"] for r in payload["rows"] if r["setting"] == setting and r["situation"] == "alone"
        )
        for situation in situations:
            rows = [r for r in payload["rows"] if r["setting"] == setting and r["situation"] == situation]
            med = statistics.median(r["median_volume_s"] for r in rows)
            summary.append(
                {
                    "setting": setting,
                    "situation": situation,
                    "median_volume_s": med,
                    "vs_alone": round(med / alone, 2),
                    "worst_max_over_median": max(r["max_over_median"] for r in rows),
                }
            )
    payload["summary"] = summary
    payload["others_busy_cores_at_end"] = others_cpu_use()
    print(table(summary, ["setting", "situation", "median_volume_s", "vs_alone", "worst_max_over_median"]))
    print(f"saved {save('sharing', payload)}")


if __name__ == "__main__":
    main()
