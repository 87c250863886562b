#!/bin/bash
# Generate a synthetic cohort with torchrun: one process per GPU (or per CPU worker), seeds split over ranks.
#
#   examples/torchrun_generate.sh                  # this machine: all GPUs, or 2 CPU workers without a GPU
#   NPROC=4 NUM=5000 examples/torchrun_generate.sh
#
# Each rank takes whole blocks of BATCH seeds (block b goes to rank b % WORLD_SIZE), runs on cuda:LOCAL_RANK
# (NCCL) or on the CPU (gloo), writes its own <model>_seed<S>.nii.gz + .json, and after a barrier rank 0 writes
# OUT/cohort.csv from the sidecars. Re-running the same command resumes: valid subjects are skipped.
# The files are the ones a single `meddiff generate` with the same NUM, SEED and BATCH writes, byte for byte
# (same device type; on CPU the same OMP_NUM_THREADS).
#
# Note the `--` after the module: without it torchrun's own option parser takes `--num` for an abbreviation
# of its `--numa-binding` and stops.

set -euo pipefail

MODEL=${MODEL:-brain-ldm-3d}
NUM=${NUM:-1000}
SEED=${SEED:-0}
BATCH=${BATCH:-4}
OUT=${OUT:-cohort-synthetic}
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    NPROC=${NPROC:-gpu}                       # one process per visible GPU
else
    NPROC=${NPROC:-2}                         # CPU workers (gloo); give each its share of the cores
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi

# Single node (--standalone picks a free port, so several jobs can share a machine):
torchrun --standalone --nproc_per_node "$NPROC" \
    -m napari_meddiff.cli -- generate --model "$MODEL" --num "$NUM" --seed "$SEED" --batch-size "$BATCH" --out "$OUT"

# Multi-node, e.g. 4 nodes x 8 GPUs under SLURM (sbatch --nodes=4 --ntasks-per-node=1 --gres=gpu:8):
# one torchrun per node, meeting at the first node; OUT must be on a shared filesystem.
#
#   HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
#   srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8 \
#       --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:29500" \
#       -m napari_meddiff.cli -- generate --num 100000 --batch-size 16 --out /shared/cohort
#
# Without SLURM, run on every node (NODE_RANK 0..N-1, HEAD the address of node 0):
#   torchrun --nnodes 2 --node_rank "$NODE_RANK" --nproc_per_node 8 --master_addr "$HEAD" --master_port 29500 \
#       -m napari_meddiff.cli -- generate --num 100000 --batch-size 16 --out /shared/cohort
#
# If a rank fails, torchrun stops the others; re-run the same command to resume.
