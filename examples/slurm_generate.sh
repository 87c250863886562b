#!/bin/bash
# Generate a synthetic cohort with a SLURM job array: every array task is one shard of the seeds.
#
#   sbatch examples/slurm_generate.sh                              # 1000 volumes in 10 shards, CPU
#   NUM=5000 sbatch --array=0-49%8 examples/slurm_generate.sh      # 50 shards, at most 8 running at once
#   sbatch --gres=gpu:1 --partition=gpu examples/slurm_generate.sh # one GPU per shard (see the GPU lines)
#
# How it fits together:
# - Seeds SEED..SEED+NUM-1 are cut into blocks of BATCH seeds; shard i of n takes blocks i, i+n, i+2n, ...
#   Every shard must therefore get the same NUM, SEED, BATCH and MODEL (the defaults below), or the blocks
#   differ. Then the union of the shards is the single-process run file for file.
# - Each shard writes only its own <model>_seed<S>.nii.gz + .json (the JSON sidecar holds the sha256 of the
#   image). The shard that completes the cohort writes OUT/cohort.csv; or build it any time with
#   `meddiff generate --merge-manifest OUT` (it also re-checks every file's sha256 and exits 1 on problems).
# - Pre-emption / requeue / crashes: files are written to hidden temporary names and renamed, so no partial
#   file ever has a final name. Re-submitting the same array (or `scontrol requeue`) skips the subjects that are
#   already written and valid, and regenerates missing or corrupt ones.
# - Bit-identical output needs the same kind of device everywhere and, on CPU, the same thread count
#   (OMP_NUM_THREADS below): oneDNN's batched kernels round differently with different thread counts.
# - OUT must be on a filesystem all nodes share.
#
#SBATCH --job-name=meddiff-generate
#SBATCH --array=0-9
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --output=%x_%A_%a.log
# GPU shards: uncomment (one GPU per task; `meddiff generate` picks it up with --device auto).
##SBATCH --gres=gpu:1
##SBATCH --partition=gpu

set -euo pipefail

MODEL=${MODEL:-brain-ldm-3d}
NUM=${NUM:-1000}
SEED=${SEED:-0}
BATCH=${BATCH:-4}          # samples per forward pass (CPU: 2-4; GPU: as many as fit, e.g. 16)
OUT=${OUT:-cohort-synthetic}
VENV=${VENV:-.venv}        # the environment napari-meddiff is installed in

# shellcheck disable=SC1091
source "$VENV/bin/activate"
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# Shards are 0-based. SLURM_ARRAY_TASK_ID runs over the --array range, so subtract its first value
# (an array 1-10 becomes shards 0..9). Do not use array steps (0-9:2): TASK_COUNT would not match.
TASK_ID=${SLURM_ARRAY_TASK_ID:-0}
TASK_MIN=${SLURM_ARRAY_TASK_MIN:-0}
TASK_COUNT=${SLURM_ARRAY_TASK_COUNT:-1}
SHARD=$((TASK_ID - TASK_MIN))/$TASK_COUNT

echo "shard $SHARD on $(hostname): $MODEL seeds $SEED..$((SEED + NUM - 1)) -> $OUT"
meddiff generate --model "$MODEL" --num "$NUM" --seed "$SEED" --batch-size "$BATCH" \
    --shard "$SHARD" --out "$OUT"

# To check and index the finished cohort in a job of its own, submit after the array:
#   sbatch --dependency=afterok:<array job id> \
#       --wrap "source $VENV/bin/activate && meddiff generate --merge-manifest $OUT"
