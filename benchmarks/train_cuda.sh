#!/usr/bin/env bash
# Train the 2 mm brain-ldm-3d autoencoder (issue 16) on a lent GPU from its stored checkpoint and bring the
# full checkpoint back. A device machine has torch but not monai, nibabel or nilearn, is sent main's working
# tree plus carried paths (64 MiB in all), and returns files of at most 16 MiB: hence three steps.
#
# Checkpoints stay outside git, under runs/ (in .gitignore): the work dirs runs/NAME, the carried copies in
# runs/carry/, the store of benchmarks/checkpoints.sh in runs/checkpoints/. Nothing here copies a checkpoint into
# the repository or commits one. Training resumes from a model folder through `training.init_from`, or from a
# checkpoint kept outside the repository (checkpoints.sh restore NAME runs/NAME/FILE, then --resume).
#
#   here:    bash benchmarks/train_cuda.sh prepare
#            (wheels into .whl/, the slim checkpoint into runs/carry/; prints what will travel)
#   device:  run(command="bash benchmarks/train_cuda.sh train 5", carry=[".whl", "runs/carry"], timeout_s=590)
#            (writes the 200 training subjects with 16 processes, trains up to MINUTES=5 with --autoencoder-only,
#            fewer if the set-up took long: the whole command keeps within MEDDIFF_DEADLINE=560 s; splits the
#            full checkpoint into 15 MB parts under $OUT)
#   here:    bash benchmarks/train_cuda.sh collect FILES_AT
#            (joins and checks the parts, keeps the earlier checkpoint as .before-gpu-*, measures held-out PSNR
#            and keeps the checkpoint in the store (checkpoints.sh save); then commit the curve and PSNR line)
#
# The carried checkpoint is slim (EMA weights, no Adam state: `slim_checkpoint`), so the GPU run restarts Adam
# with its warm-up; what comes back is a full checkpoint again. A dry run on a CPU:
#   OUT=/tmp/out MEDDIFF_DEVICE=cpu MEDDIFF_SUBJECTS=4 bash benchmarks/train_cuda.sh train 0.5
#
# The conditional 2 mm diffusion UNet (models/brain-ldm-3d/training/train-2mm-conditional.yaml) the same way:
#   here:    bash benchmarks/train_cuda.sh prepare-ldm
#            (wheels, and the slim frozen autoencoder of runs/ldm-2mm-cond into runs/carry/ldm/)
#   device:  run(command="bash benchmarks/train_cuda.sh train-ldm 6", carry=[".whl", "runs/carry"], timeout_s=590)
#            (a diffusion UNet from scratch at batch MEDDIFF_BATCH=32: the CPU run's checkpoint (133 MB full, 33 MB
#            slim) does not fit beside the tree, the wheels and the autoencoder in the 64 MiB a device machine is
#            sent; brings back its slim checkpoint in 15 MB parts)
#   here:    bash benchmarks/train_cuda.sh collect-ldm FILES_AT
#            (joins and checks it, keeps the CPU run's diffusion.pt as .before-gpu-*, exports runs/ldm-2mm-cond/model)
# Dry run: OUT=/tmp/out MEDDIFF_DEVICE=cpu MEDDIFF_SUBJECTS=4 MEDDIFF_BATCH=2 bash benchmarks/train_cuda.sh train-ldm 0.3
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=models/brain-ldm-3d/train-2mm.yaml
WORK=runs/brain-ldm-3d-2mm
CKPT=brain-ldm-3d/autoencoder-2mm.ckpt   # benchmarks/checkpoints.sh: its store, or main's history for older saves
LDM_CONFIG=models/brain-ldm-3d/training/train-2mm-conditional.yaml
LDM_WORK=runs/ldm-2mm-cond
LDM_CKPT=brain-ldm-3d-2mm-conditional/diffusion.ckpt   # slim, ditto
CARRY=runs/carry   # what travels to the device machine besides the wheels: ignored by git (runs/)
export PYTHONUNBUFFERED=1
die() { echo "train_cuda.sh: $*" >&2; exit 1; }

wheels() {  # .whl/ (monai, nibabel, nilearn at this venv's versions) and an empty $CARRY/
  local py=$1
  grep -qxF /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  rm -rf .whl "$CARRY" && mkdir -p .whl "$CARRY"
  local pkgs=()
  for p in monai nibabel nilearn; do pkgs+=("$p==$("$py" -c "import importlib.metadata as m; print(m.version('$p'))")"); done
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform any -d .whl "${pkgs[@]}"
}

check_travel() {
  local tree carried
  tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  carried=$(du -cb .whl "$CARRY" | tail -1 | cut -f1)
  echo "travels: main's tree $((tree / 1000000)) MB + .whl, $CARRY $((carried / 1000000)) MB (limit 67 MB)"
  [ $((tree + carried)) -lt 67108864 ] || die "over the 64 MiB a device machine is sent"
}

prepare() {
  local py=${PYTHON:-.venv/bin/python}
  wheels "$py"
  local full=$WORK/autoencoder.pt
  if [ ! -f "$full" ]; then bash benchmarks/checkpoints.sh restore "$CKPT" "$full"; fi
  "$py" - "$full" "$CARRY" <<'EOF'
import hashlib, json, sys
from pathlib import Path
from napari_meddiff.training.checkpoints import slim_checkpoint
carry = Path(sys.argv[2])
st = slim_checkpoint(Path(sys.argv[1]), carry / "autoencoder.pt")
sha = hashlib.sha256(Path(sys.argv[1]).read_bytes()).hexdigest()
(carry / "source.json").write_text(json.dumps({"file": sys.argv[1], "sha256": sha, "step": st["step"]}) + "\n")
print(f"slim checkpoint of {sys.argv[1]}: step {st['step']}, {st['minutes']:.1f} min spent")
EOF
  check_travel
}

prepare_ldm() {
  local py=${PYTHON:-.venv/bin/python}
  wheels "$py"
  mkdir -p "$CARRY/ldm"
  local ae=$LDM_WORK/autoencoder.pt
  if [ ! -f "$ae" ]; then bash benchmarks/checkpoints.sh restore "$CKPT" "$ae"; fi
  "$py" - "$ae" "$LDM_CONFIG" "$CARRY" <<'EOF'
import json, sys
from pathlib import Path
from napari_meddiff.training.autoencoder import encoder_sha256
from napari_meddiff.training.checkpoints import slim_checkpoint
from napari_meddiff.training.config import load_config
from napari_meddiff.models import build_network
cfg = load_config(sys.argv[2])
carry = Path(sys.argv[3]) / "ldm"
st = slim_checkpoint(Path(sys.argv[1]), carry / "autoencoder.pt")
if st["step"] != cfg["autoencoder_training"]["steps"]:
    sys.exit(f"{sys.argv[1]} is at step {st['step']}; {sys.argv[2]} freezes the autoencoder at "
             f"{cfg['autoencoder_training']['steps']}")
ae = build_network("autoencoder", cfg["networks"]["autoencoder"])
ae.load_state_dict(st["ema"])
digest = encoder_sha256(ae)
(carry / "source.json").write_text(json.dumps({"step": st["step"], "encoder_sha256": digest}) + "\n")
print(f"slim autoencoder of {sys.argv[1]}: step {st['step']}, encoder sha256 {digest[:12]}")
EOF
  check_travel
}


write_cohort() {  # DST N JOBS: the training subjects in parallel chunks, then one manifest
  local dst=$1 n=$2 jobs=$3 per=$(( ($2 + $3 - 1) / $3 ))
  if [ -f "$dst/cohort.csv" ] && [ $(( $(wc -l < "$dst/cohort.csv") - 1 )) -ge "$n" ]; then return; fi
  rm -rf "$dst.parts" && mkdir -p "$dst.parts" "$dst"
  for ((k = 0; k * per < n; k++)); do
    local num=$(( n - k * per < per ? n - k * per : per ))
    OMP_NUM_THREADS=1 "$PY" -m napari_meddiff.cli cohort --num "$num" --seed $((k * per)) \
        --out "$dst.parts/$k" --quiet > /dev/null &
  done
  wait
  for part in "$dst.parts"/*; do mv "$part"/sub-* "$dst"/; cp "$part/cohort.json" "$dst"/; done
  rm -rf "$dst.parts"
  # complete subjects are skipped: this only writes the manifest of all of them
  OMP_NUM_THREADS=4 "$PY" -m napari_meddiff.cli cohort --num "$n" --seed 0 --out "$dst" --quiet > /dev/null
}

send_back() {  # FILE of work/: its sha256 and 15 MB parts into $OUT (a device machine returns files of <= 16 MiB)
  (cd work && sha256sum "$1" > "$OUT/$1.sha256" && split -b 15000000 -d "$1" "$OUT/$1.part")
}

join_back() {  # FILES_AT NAME DST: the parts of NAME joined into DST, checked against their sha256
  cat "$1/$2".part* > "$3"
  (cd "$(dirname "$3")" && sed "s/$2\$/$(basename "$3")/" "$1/$2.sha256" | sha256sum -c --quiet) \
      || die "the joined checkpoint does not match its sha256"
}

setup_python() {  # the carried wheels, the repository on PYTHONPATH, the GPU named in $OUT/log.txt
  local repo=$1
  if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$repo
  else
    export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
  fi
  { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } | tee "$OUT/log.txt"
  "$PY" -c "import monai, nibabel, nilearn.datasets, safetensors, yaml, napari_meddiff.training" \
      || die "missing Python packages on this machine (see above)"
}

train_ldm() {  # on the device machine: a conditional diffusion UNet from scratch on the frozen autoencoder
  local minutes=${1:?minutes of training} device=${MEDDIFF_DEVICE:-cuda} t0=$SECONDS
  local scratch=${MEDDIFF_SCRATCH:-/tmp/meddiff-train-ldm} repo=$PWD deadline=${MEDDIFF_DEADLINE:-560}
  local batch=${MEDDIFF_BATCH:-32}
  PY=${PYTHON:-python3}
  : "${OUT:?OUT (the folder that comes back) is not set}"
  mkdir -p "$OUT" && OUT=$(realpath "$OUT")
  [ -f "$CARRY/ldm/autoencoder.pt" ] || die "$CARRY/ldm/autoencoder.pt missing: run 'prepare-ldm' here and carry $CARRY"
  setup_python "$repo"
  mkdir -p "$scratch/work" && cd "$scratch"
  write_cohort data/cohort-2mm-train "${MEDDIFF_SUBJECTS:-200}" "${MEDDIFF_JOBS:-16}"
  echo "cohort ready after $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
  rm -f work/diffusion.pt work/latents.pt work/conditions.json
  cp "$repo/$CARRY/ldm/autoencoder.pt" work/autoencoder.pt
  # what is left of the deadline, less ~3 min for data loading, encoding the latents, the export and splitting
  minutes=$("$PY" -c "print(round(max(0.3, min($minutes, ($deadline - $((SECONDS - t0)) - 180) / 60)), 2))")
  "$PY" - "$repo/$LDM_CONFIG" work/train-gpu.yaml "$minutes" "$batch" <<'EOF'
import sys
import yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["training"].update(max_minutes=float(sys.argv[3]), batch_size=int(sys.argv[4]), val_every=0,
                       checkpoint_minutes=2, num_threads=4)
yaml.safe_dump(cfg, open(sys.argv[2], "w"))
EOF
  echo "training for $minutes min at batch $batch" | tee -a "$OUT/log.txt"
  set +e
  "$PY" -m napari_meddiff.cli train work/train-gpu.yaml --work-dir work --out work/model --resume \
      --device "$device" --no-progress 2>&1 | tee -a "$OUT/log.txt"
  local rc=${PIPESTATUS[0]}
  set -e
  echo "training exited $rc after $((SECONDS - t0)) s in all" | tee -a "$OUT/log.txt"
  [ -f work/diffusion.pt ] || die "no diffusion checkpoint was written (see $OUT/log.txt)"
  "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
from pathlib import Path
from napari_meddiff.training.checkpoints import slim_checkpoint
st = slim_checkpoint(Path("work/diffusion.pt"), Path("work/diffusion-slim.pt"))
print(f"slim diffusion checkpoint: step {st['step']}, {st['minutes']:.1f} min")
EOF
  send_back diffusion-slim.pt
  cp work/loss_diffusion.png "$OUT/" 2>/dev/null || true
  ls -la "$OUT"
  return "$rc"
}

collect_ldm() {
  local files=${1:?the folder the device files came back to (files_at)} py=${PYTHON:-.venv/bin/python}
  local new=$LDM_WORK/diffusion.pt.new
  [ -f "$CARRY/ldm/source.json" ] || die "$CARRY/ldm/source.json missing: collect-ldm needs the prepare-ldm of this run"
  if pgrep -f -- "--work-dir $LDM_WORK" > /dev/null; then die "a training process is using $LDM_WORK: stop it first"; fi
  mkdir -p "$LDM_WORK"
  join_back "$files" diffusion-slim.pt "$new"
  local step
  step=$("$py" -c "
import sys, torch
st = torch.load('$new', weights_only=True)
if not st.get('slim') or st.get('ema') is None:
    sys.exit('not a slim diffusion checkpoint')
print(st['step'])") || { rm -f "$new"; die "the returned checkpoint was not taken"; }
  [ ! -f "$LDM_WORK/diffusion.pt" ] || mv "$LDM_WORK/diffusion.pt" "$LDM_WORK/diffusion.pt.before-gpu-$(date +%Y%m%d-%H%M%S)"
  mv "$new" "$LDM_WORK/diffusion.pt"
  [ ! -f "$files/loss_diffusion.png" ] || cp "$files/loss_diffusion.png" "$LDM_WORK/loss_diffusion.png"
  # the model folder of it (the autoencoder stage is at its step; the latents cached here, or encoded again)
  "$py" -m napari_meddiff.cli train "$LDM_CONFIG" --work-dir "$LDM_WORK" --out "$LDM_WORK/model" --resume \
      --steps "$step" --overwrite --threads 2 --no-progress
  echo "now: python benchmarks/evaluate_models.py --models $LDM_WORK/model --heldout data/cohort-2mm-heldout;" \
       "bash benchmarks/checkpoints.sh save $LDM_WORK/diffusion.pt $LDM_CKPT \"step $step (GPU run)\";" \
       "then the tables in models/brain-ldm-3d/training/README.md"
}


train() {  # on the device machine; works in a scratch folder, never in the checkout's data/ or runs/
  local minutes=${1:?minutes of training} device=${MEDDIFF_DEVICE:-cuda} t0=$SECONDS
  local scratch=${MEDDIFF_SCRATCH:-/tmp/meddiff-train} repo=$PWD deadline=${MEDDIFF_DEADLINE:-560}
  PY=${PYTHON:-python3}
  : "${OUT:?OUT (the folder that comes back) is not set}"
  mkdir -p "$OUT" && OUT=$(realpath "$OUT")  # a relative OUT is read from the repository root
  [ -f "$CARRY/autoencoder.pt" ] || die "$CARRY/autoencoder.pt missing: run 'prepare' here and carry $CARRY"
  setup_python "$repo"
  mkdir -p "$scratch/work" && cd "$scratch"  # the config's data/cohort-2mm-train is found here first
  write_cohort data/cohort-2mm-train "${MEDDIFF_SUBJECTS:-200}" "${MEDDIFF_JOBS:-16}"
  echo "cohort ready after $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
  cp "$repo/$CARRY/autoencoder.pt" work/autoencoder.pt
  # what is left of the deadline, less ~2 min for data loading, the final validation, saving and splitting
  minutes=$("$PY" -c "print(round(max(0.5, min($minutes, ($deadline - $((SECONDS - t0)) - 120) / 60)), 2))")
  echo "training for $minutes min" | tee -a "$OUT/log.txt"
  local total
  total=$("$PY" -c "import torch; print(torch.load('work/autoencoder.pt', weights_only=True)['minutes'] + $minutes)")
  set +e
  "$PY" -m napari_meddiff.cli train "$repo/$CONFIG" --work-dir work --autoencoder-only --resume --device "$device" \
      --max-minutes "$total" --no-progress 2>&1 | tee -a "$OUT/log.txt"
  local rc=${PIPESTATUS[0]}
  set -e
  echo "training exited $rc after $((SECONDS - t0)) s in all" | tee -a "$OUT/log.txt"
  send_back autoencoder.pt
  cp work/autoencoder_curve.json "$OUT/" 2>/dev/null || true
  ls -la "$OUT"
  return "$rc"
}

collect() {
  local files=${1:?the folder the device files came back to (files_at)} py=${PYTHON:-.venv/bin/python}
  local new=$WORK/autoencoder.pt.new
  [ -f "$CARRY/source.json" ] || die "$CARRY/source.json missing: collect needs the prepare of this run"
  if pgrep -f -- "--work-dir $WORK" > /dev/null; then die "a training process is using $WORK: stop it first"; fi
  if [ -f "$WORK/autoencoder.pt" ]; then  # the local checkpoint must still be the one the GPU run started from
    "$py" -c "
import hashlib, json, sys
src = json.load(open('$CARRY/source.json'))
sys.exit(hashlib.sha256(open('$WORK/autoencoder.pt', 'rb').read()).hexdigest() != src['sha256'])" \
      || die "$WORK/autoencoder.pt changed since prepare (a CPU run went on?): compare the steps and move one away"
  fi
  mkdir -p "$WORK"
  join_back "$files" autoencoder.pt "$new"
  "$py" -c "
import json, sys, torch
st = torch.load('$new', weights_only=True)
carried = json.load(open('$CARRY/source.json'))['step']
if 'optimizer' not in st or st.get('slim'):
    sys.exit('not a full checkpoint')
if st['step'] <= carried:
    sys.exit(f'the GPU run trained nothing (step {st[\"step\"]}, carried {carried})')
print(f\"device checkpoint: step {st['step']} (carried {carried}), {st['minutes']:.1f} min\")" \
      || { rm -f "$new"; die "the returned checkpoint was not taken"; }
  [ ! -f "$WORK/autoencoder.pt" ] || mv "$WORK/autoencoder.pt" "$WORK/autoencoder.pt.before-gpu-$(date +%Y%m%d-%H%M%S)"
  mv "$new" "$WORK/autoencoder.pt"
  [ ! -f "$files/autoencoder_curve.json" ] || cp "$files/autoencoder_curve.json" models/brain-ldm-3d/training/autoencoder-2mm-curve.json
  "$py" benchmarks/evaluate_ae.py --config "$CONFIG" --checkpoint "$WORK/autoencoder.pt" --threads 2 \
      --num "${MEDDIFF_HELDOUT:-16}" --log models/brain-ldm-3d/training/heldout-2mm.jsonl
  local step
  step=$("$py" -c "import torch; print(torch.load('$WORK/autoencoder.pt', weights_only=True)['step'])")
  # kept outside git: in $WORK and in the checkpoint store (runs/checkpoints), never committed
  bash benchmarks/checkpoints.sh save "$WORK/autoencoder.pt" "$CKPT" "2 mm AE at step $step (GPU run)"
  echo "now: update the table in models/brain-ldm-3d/training/README.md and commit models/brain-ldm-3d/training"
}

case "${1:-}" in
  prepare) prepare ;;
  train) shift; train "$@" ;;
  collect) shift; collect "$@" ;;
  prepare-ldm) prepare_ldm ;;
  train-ldm) shift; train_ldm "$@" ;;
  collect-ldm) shift; collect_ldm "$@" ;;
  *) die "usage: prepare | train MINUTES | collect FILES_AT | prepare-ldm | train-ldm MINUTES | collect-ldm FILES_AT" ;;
esac
