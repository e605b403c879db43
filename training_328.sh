#!/usr/bin/env bash
# Preprocess, train SyncNet, train the U-Net, evaluate: the whole pipeline for one avatar.
#
#   bash training_328.sh NAME GPU_ID[,GPU_ID...] [train_328.py options]
#   bash training_328.sh May 0                       # one GPU
#   bash training_328.sh May 0,1 --batchsize 16      # DDP over two GPUs (torchrun)
#   bash training_328.sh May cpu --size small        # CPU, small model
#
# The video is dataset/NAME/NAME.mp4. Preprocessing runs when the dataset is missing or older than the
# video. `--size` is passed to both trainers; every other option goes to train_328.py. Environment:
#   PYTHON        interpreter (default: .venv/bin/python, else python3)
#   SYNCNET_ARGS  extra syncnet_328.py options, e.g. "--epochs 20"
#   EVAL_ARGS     extra evaluate.py options, e.g. "--max_frames 200"
#   EVALUATE      evaluation script (default evaluate.py; skipped when absent)
#   SYNC_LOSS     1: train the U-Net with the SyncNet loss (default 0; the SyncNet is trained either way and
#                 used by the evaluation)
#   SYNCTALK_PATHS__DATASET_ROOT / __CHECKPOINT_ROOT / __SYNCNET_ROOT   roots (as in config.py)
# Stops at the first failing stage with its message and exit code; prints the final checkpoint path.
set -uo pipefail

die() { echo "error: $*" >&2; exit 2; }

[ $# -ge 2 ] || die "usage: bash training_328.sh NAME GPU_ID[,GPU_ID...]|cpu [train_328.py options]"
NAME=$1
GPUS=$2
shift 2
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "invalid avatar name '$NAME' (letters, digits, . _ - only)"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO" || die "cannot enter $REPO"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DATASET_ROOT=${SYNCTALK_PATHS__DATASET_ROOT:-dataset}
CHECKPOINT_ROOT=${SYNCTALK_PATHS__CHECKPOINT_ROOT:-checkpoint}
SYNCNET_ROOT=${SYNCTALK_PATHS__SYNCNET_ROOT:-syncnet_ckpt}
EVALUATE=${EVALUATE:-evaluate.py}
DATA="$DATASET_ROOT/$NAME"
VIDEO="$DATA/$NAME.mp4"
SYNC_DIR="$SYNCNET_ROOT/$NAME"
SAVE_DIR="$CHECKPOINT_ROOT/$NAME"

# Devices: "cpu", or a comma-separated list of GPU ids (one training process per GPU).
if [ "$GPUS" = "cpu" ]; then
    DEVICE=cpu
    NPROC=1
else
    [[ "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "GPU_ID must be 'cpu' or GPU ids like 0 or 0,1 (got '$GPUS')"
    export CUDA_VISIBLE_DEVICES="$GPUS"
    DEVICE=cuda
    NPROC=$(echo "$GPUS" | tr ',' '\n' | wc -l)
fi

# --size goes to both trainers.
SIZE_ARGS=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --size) SIZE_ARGS=(--size "${args[$((i + 1))]:-}") ;;
        --size=*) SIZE_ARGS=("${args[$i]}") ;;
    esac
done
read -r -a SYNCNET_EXTRA <<< "${SYNCNET_ARGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"

stage() {  # stage NUMBER LABEL COMMAND...
    local num=$1 label=$2
    shift 2
    echo "== stage $num/4: $label" >&2
    "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "error: stage $num/4 ($label) failed with exit code $rc; see the message above" >&2
        exit $rc
    fi
}

# 1. Preprocessing, when the dataset is missing, incomplete or older than the video.
needs_processing() {
    [ -d "$DATA/full_body_img" ] || return 0
    local feats=""
    for f in "$DATA/aud_whisper.npy" "$DATA/aud_ave.npy"; do [ -f "$f" ] && feats=$f && break; done
    [ -n "$feats" ] || return 0
    [ -f "$DATA/crop_boxes.npy" ] || [ -d "$DATA/landmarks" ] || return 0
    [ -f "$VIDEO" ] && [ "$VIDEO" -nt "$feats" ] && return 0
    return 1
}
if needs_processing; then
    [ -f "$VIDEO" ] || die "video not found: $VIDEO (put the recording there, then run this script again)"
    stage 1 "preprocessing $VIDEO" "$PYTHON" data_utils/process.py "$VIDEO"
else
    echo "== stage 1/4: dataset $DATA is up to date, preprocessing skipped" >&2
fi

# 2. SyncNet (one device).
SYNC_DEVICE=$DEVICE
stage 2 "SyncNet training" "$PYTHON" syncnet_328.py --dataset_dir "$DATA" --save_dir "$SYNC_DIR" \
    --device "$SYNC_DEVICE" "${SIZE_ARGS[@]}" "${SYNCNET_EXTRA[@]}"
[ -f "$SYNC_DIR/best.pth" ] || die "SyncNet training wrote no $SYNC_DIR/best.pth"

# 3. U-Net (torchrun DDP over several GPUs). train_328.py prints the final checkpoint on stdout.
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
# The SyncNet loss is off by default (the recipe study in docs/training-guide.md: at a CPU budget it cost
# lip-sync and sharpness); SYNC_LOSS=1 turns it on with the SyncNet just trained.
SYNC_LOSS_ARGS=()
[ "${SYNC_LOSS:-0}" = "1" ] && SYNC_LOSS_ARGS=(--use_syncnet --syncnet_checkpoint "$SYNC_DIR/best.pth")
UNET_ARGS=(train_328.py --dataset_dir "$DATA" --save_dir "$SAVE_DIR" "${SYNC_LOSS_ARGS[@]}" --device "$DEVICE" "$@")
run_unet() {
    if [ "$NPROC" -gt 1 ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "${UNET_ARGS[@]}" | tee "$OUT"
    else
        "$PYTHON" "${UNET_ARGS[@]}" | tee "$OUT"
    fi
}
stage 3 "U-Net training" run_unet
FINAL=$(grep -E '\.pth$' "$OUT" | tail -n 1)
[ -n "$FINAL" ] && [ -f "$FINAL" ] || die "U-Net training reported no checkpoint"

# 4. Evaluation, when evaluate.py is there and runs.
if [ ! -f "$EVALUATE" ]; then
    echo "== stage 4/4: $EVALUATE not found, the evaluation step is skipped" >&2
elif ! "$PYTHON" "$EVALUATE" --help > /dev/null 2>&1; then
    echo "== stage 4/4: $EVALUATE does not run (--help failed), the evaluation step is skipped" >&2
else
    stage 4 "evaluation" "$PYTHON" "$EVALUATE" --name "$NAME" --dataset_root "$DATASET_ROOT" \
        --checkpoint_root "$CHECKPOINT_ROOT" --syncnet_root "$SYNCNET_ROOT" --checkpoint "$FINAL" \
        --device "$SYNC_DEVICE" "${EVAL_EXTRA[@]}"
fi

echo "final checkpoint: $FINAL"
