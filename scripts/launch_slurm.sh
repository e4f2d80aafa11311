#!/bin/bash
# Zephyr 141B-A39B: ORPO on Mixtral-8x22B with the alignment-handbook recipe, on 4 nodes x 8 H100
# (80 GB), one JAX process per node owning its 8 GPUs.
#
#   sbatch scripts/launch_slurm.sh                      # the recipe as configured
#   sbatch scripts/launch_slurm.sh --max_steps 20       # extra --key value pairs override it
#
# Before the first run (from a login node, once; everything below lives on shared storage):
#   huggingface-cli download mistral-community/Mixtral-8x22B-v0.1 --local-dir "$MODEL_DIR"
#   python -c "import datasets; datasets.load_dataset('argilla/distilabel-capybara-dpo-7k-binarized')"
#   python -m zephyr_jax.plan configs/zephyr-141b-orpo.yaml --mesh 4x8   # memory / time plan, CPU only
#
# zephyr_jax.distributed reads SLURM_NTASKS / SLURM_PROCID / SLURM_STEP_NODELIST: the coordinator
# is the first node of the step, on $JAX_COORDINATOR_PORT (default 61440 + job id mod 4096).
# The mesh {data: 4, expert: 8} of the config puts each layer's 8 experts on the 8 GPUs of a node
# (all-to-all over NVLink) and FSDP over all 32. SIGTERM (sent 10 min before the time limit, or by
# scancel / preemption) makes every process save a checkpoint at the same step and exit; sbatch
# the same script again with the same OUTPUT_DIR to resume.

#SBATCH --job-name=zephyr-141b-orpo
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=06:00:00
#SBATCH --signal=TERM@600
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
MODEL_DIR=${MODEL_DIR:-$REPO_DIR/models/Mixtral-8x22B-v0.1}   # local copy of the Hub weights
OUTPUT_DIR=${OUTPUT_DIR:-$REPO_DIR/outputs/zephyr-orpo-141b-A35b}
CONFIG=${CONFIG:-configs/zephyr-141b-orpo.yaml}
cd "$REPO_DIR"
mkdir -p logs "$OUTPUT_DIR"

# One process per node sees all 8 GPUs (zephyr_jax.distributed passes no local_device_ids).
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}
# XLA preallocates 75% of each GPU by default; the planned step needs more (see README).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
# Overlap the FSDP all-gathers / reduce-scatters with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export JAX_COORDINATOR_PORT=${JAX_COORDINATOR_PORT:-$((61440 + SLURM_JOB_ID % 4096))}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Data and weights were fetched beforehand: no process touches the Hub during the run.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

echo "[launch] job $SLURM_JOB_ID: $SLURM_NNODES nodes ($SLURM_JOB_NODELIST), coordinator port" \
     "$JAX_COORDINATOR_PORT, output $OUTPUT_DIR"

srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    python -m zephyr_jax.train "$CONFIG" \
        --model_name_or_path "$MODEL_DIR" \
        --output_dir "$OUTPUT_DIR" \
        "$@"
