"""The same segmentation through the CLI and through the napari Segment widget: wall times, their ratio, and the
longest gap in napari's event loop while the widget's task runs (issue 37: within 1.3x of the CLI, no gap over
100 ms).

    python benchmarks/bench_widget_vs_cli.py                  # brain-tissue-segdiff-2d, its default settings
    python benchmarks/bench_widget_vs_cli.py --ensemble 2 --steps 4
    python benchmarks/bench_widget_vs_cli.py --quick          # a tiny random model on a small scan (a check)

Each side runs in a fresh process, one after the other: ``meddiff segment`` (``python -m napari_meddiff.cli``),
then napari (under ``xvfb-run`` when there is no display) with the scan opened through the plugin's reader and
the Segment widget added; once its background import is done, Segment is clicked and the event loop runs until
the task ends. In both the `segment` call itself is timed (the same work: ``task_s``); the CLI's whole command
(``wall_s``: start-up, reading, writing too) and the widget's click-to-done (``click_to_done_s``: the model's
load, the result layers too) are given beside it. ``ratio`` is widget ``task_s`` / CLI ``task_s``;
``ratio_click_to_done`` is what the napari user waits over the CLI's ``task_s``.

The scan: the first ``data/screenshot-subject/*_T1w.nii.gz``, else a cohort subject written by
``meddiff cohort --num 1 --seed 100000``. Prints one JSON (the machine, the other processes' load while each
side ran: timings from a busy machine say little) and writes ``benchmarks/results/widget_vs_cli.json`` (not
with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_MODEL = "brain-tissue-segdiff-2d"
XVFB = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24"]

# the CLI, with `segment` timed (torch loads after configure_waiting, as in the plain command)
CLI_CHILD = """
import json, sys, time
from napari_meddiff.runtime.threads import configure_waiting
configure_waiting()
import napari_meddiff.tasks.segment as tasks
real, spans = tasks.segment, []
def timed(*a, **k):
    t = time.perf_counter(); r = real(*a, **k); spans.append(time.perf_counter() - t); return r
tasks.segment = timed
import torch
from napari_meddiff.cli import main
rc = main(sys.argv[1:])
print("BENCH " + json.dumps({"rc": rc, "task_s": spans[0] if spans else None, "threads": torch.get_num_threads()}))
"""


def scan_for(quick: bool, tmp: Path) -> Path:
    if quick:
        import nibabel as nib
        import numpy as np

        rng = np.random.default_rng(0)
        array = (rng.random((24, 28, 12)) * 100).astype(np.float32)
        path = tmp / "quick_T1w.nii.gz"
        nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
        return path
    found = sorted((REPO / "data" / "screenshot-subject").glob("*_T1w.nii.gz"))
    if found:
        return found[0]
    out = tmp / "cohort"
    subprocess.run(
        [sys.executable, "-m", "napari_meddiff.cli", "cohort", "--num", "1", "--seed", "100000", "--out", str(out)],
        check=True,
    )
    return sorted(out.rglob("*T1w*.nii.gz"))[0]


def model_for(args: argparse.Namespace, tmp: Path) -> Path:
    if args.quick:
        from napari_meddiff.testing.tiny_models import make_tiny_model

        return make_tiny_model(tmp / "tiny-seg-2d", "segmentation", 2, image_shape=(16, 16))
    from napari_meddiff.models import find_model_dir

    return find_model_dir(args.model)


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cli(args: argparse.Namespace, model: Path, scan: Path, tmp: Path) -> dict:
    from napari_meddiff.runtime.threads import cpu_counters

    cmd = [sys.executable, "-c", CLI_CHILD, "segment", "--model", str(model), "--image", str(scan)]
    cmd += ["--out", str(tmp / "cli-out"), "--ensemble", str(args.ensemble), "--seed", "0", "--overwrite"]
    cmd += ["--steps", str(args.steps)] if args.steps else []
    before, children = cpu_counters(), cpu_seconds_of_children()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after, children = cpu_counters(), cpu_seconds_of_children() - children
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"meddiff segment failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(line[len("BENCH ") :])
    out["wall_s"] = wall
    if before and after:  # /proc/stat ticks are 1/100 s; the child's own CPU is not "others"
        ticks = os.sysconf("SC_CLK_TCK")
        others = (after[0] - before[0]) / ticks - children - (after[2] - before[2]) / ticks
        out["others_busy_cores"] = round(max(0.0, others / wall), 2)
    return out


WIDGET_CHILD = """
import json, sys, time
import napari
from qtpy.QtCore import QEventLoop, QTimer
from napari_meddiff._napari.event_loop import Heartbeat

opts = json.loads(sys.argv[1])
viewer = napari.Viewer(show=True)
viewer.open(opts["scan"], plugin="napari-meddiff")
_, widget = viewer.window.add_plugin_dock_widget("napari-meddiff", "Segment")
from napari_meddiff._napari.widgets import runner

loop = QEventLoop()
def poll():
    if runner.is_loaded():
        QTimer.singleShot(500, loop.quit)  # settle
    else:
        QTimer.singleShot(50, poll)
QTimer.singleShot(50, poll)
loop.exec()

import napari_meddiff.tasks.segment as tasks
real, spans = tasks.segment, []
def timed(*a, **k):
    import torch
    spans.append(torch.get_num_threads())
    t = time.perf_counter(); r = real(*a, **k); spans.append(time.perf_counter() - t); return r
tasks.segment = timed

widget.model_picker.add_folder(opts["model"])
widget.ensemble.setValue(opts["ensemble"])
if opts["steps"]:
    widget.sampling.steps.setValue(opts["steps"])
widget.sampling.seed.setValue(0)
beat = Heartbeat(10).start()
loop = QEventLoop()
QTimer.singleShot(300, loop.quit)
loop.exec()
done = QEventLoop()
widget.runner.running_changed.connect(lambda running: None if running else QTimer.singleShot(0, done.quit))
clicked = time.perf_counter()
widget.segment_button.click()
done.exec()
ended = time.perf_counter()
loop = QEventLoop()
QTimer.singleShot(100, loop.quit)
loop.exec()
beat.stop()
gaps = sorted(beat.gaps(clicked, ended), key=lambda g: -g.seconds)
result = {
    "click_to_done_s": ended - clicked,
    "task_s": spans[1] if len(spans) > 1 else None,
    "threads": spans[0] if spans else None,
    "status": widget.progress.label.text(),
    "layers": [layer.name for layer in viewer.layers],
    "longest_gaps": [
        {"after_click_s": round(g.at - clicked, 3), "wall_ms": round(1000 * g.seconds, 1),
         "gui_cpu_ms": round(1000 * g.cpu, 1)}
        for g in gaps[:5]
    ],
    "others_busy_cores": beat.others_busy(),
}
print("BENCH " + json.dumps(result), flush=True)
viewer.close()
"""


def run_widget(args: argparse.Namespace, model: Path, scan: Path) -> dict:
    opts = {"scan": str(scan), "model": str(model), "ensemble": args.ensemble, "steps": args.steps}
    cmd = [sys.executable, "-c", WIDGET_CHILD, json.dumps(opts)]
    if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
        if not shutil.which("xvfb-run"):
            raise SystemExit("no display and no xvfb-run: run under a display or install xvfb")
        cmd = [*XVFB, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"the widget run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("BENCH ") :])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"segmentation model (default {DEFAULT_MODEL})")
    p.add_argument("--ensemble", type=int, default=None, help="ensemble size (default 5; --quick 2)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's; --quick 2)")
    p.add_argument("--quick", action="store_true", help="a tiny random model on a small scan: checks the script")
    args = p.parse_args(argv)
    args.ensemble = args.ensemble or (2 if args.quick else 5)
    args.steps = args.steps or (2 if args.quick else None)

    from common import machine, others_cpu_use, save

    with tempfile.TemporaryDirectory(prefix="meddiff-widget-vs-cli-") as tmp_name:
        tmp = Path(tmp_name)
        scan, model = scan_for(args.quick, tmp), model_for(args, tmp)
        load_before = others_cpu_use(1.0)
        cli = run_cli(args, model, scan, tmp)
        widget = run_widget(args, model, scan)
    gap = widget["longest_gaps"][0] if widget["longest_gaps"] else None
    payload = {
        "benchmark": "widget_vs_cli",
        "machine": machine(),
        "others_busy_cores_before": load_before,
        "model": args.model if not args.quick else "tiny-seg-2d (random weights)",
        "scan": str(scan.relative_to(REPO)) if scan.is_relative_to(REPO) else scan.name,
        "ensemble": args.ensemble,
        "steps": args.steps,
        "cli": cli,
        "widget": widget,
        "ratio": widget["task_s"] / cli["task_s"] if widget["task_s"] and cli["task_s"] else None,
        "ratio_click_to_done": widget["click_to_done_s"] / cli["task_s"] if cli["task_s"] else None,
        "longest_gap_ms": gap["wall_ms"] if gap else None,
    }
    print(json.dumps(payload, indent=2))
    if not args.quick:  # a check is not a result
        print(f"wrote {save('widget_vs_cli', payload)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
