#!/usr/bin/env bash
# Build the bundled demo avatar from the 5 minutes of one real speaker in ../shared (GRID corpus s1,
# CC BY 4.0), end to end and reproducibly from a seed:
# clips -> dataset (10 utterances held out) -> preprocessing -> SyncNet -> small U-Net (the default
# recipe, then the adjacent-frame stage, then seven feature-matching stages) -> evaluation (held-out cross-reference + three foreign voices)
# -> package into demo_avatar/ -> contact sheet in docs/images/.
#
#   bash scripts/build_demo_avatar.sh [SEED]
#
# CPU only is fine. The U-Net is trained exactly as the shipped one (docs/training-guide.md): the recipe
# study's winning recipe ("base"): 1,500 CPU seconds of training steps at lr 2e-3 (the study's shared
# start), 360 more at lr 1e-3 (the study's base arm), the long stage: 9,000 more at lr 1e-3; then the
# adjacent-frame stage (mouth region x4, image-gradient term, mouth critic, adjacent-frame term): 8,400
# CPU seconds at lr 5e-4; then the feature-matching stage (the same terms, the critic from the first step,
# gradient term x2, feature matching x5 on the critic's activations): 4,500 CPU seconds at lr 2.5e-4,
# once more from its end with its critic carried over (--init_critic), a third time so with feature
# matching x10, then three stages with a fresh critic warmed up first (--critic_warmup 500) and carried
# on (x10 for 4,500 and 3,000 CPU seconds, x15 for 4,500), and x15 for 3,000 more with each sample's audio
# window cut to its 7 centre frames (--context_drop 1.0); about 9 h of a quiet 2-core CPU. A GPU is used when present, but the
# recipe is verified on the CPU only (docs/training-guide.md, "On a GPU the study's recipe is not verified").
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${1:-0}
PY=${PYTHON:-.venv/bin/python}
SRC=../shared/media/video/grid-s1
NAME=grid_s1
DS=dataset/$NAME
OUT=result/demo_build
ATTRIBUTION='Real person: GRID corpus speaker s1 - M. Cooke, J. Barker, S. Cunningham, X. Shao, "An audio-visual corpus for speech perception and automatic speech recognition", JASA 120(5):2421-2424, 2006; data CC BY 4.0, doi 10.5281/zenodo.3625687.'
[ -f "$SRC/manifest.csv" ] || { echo "error: $SRC not found (the GRID s1 clips)" >&2; exit 2; }
mkdir -p "$OUT"

echo "== 1/7 dataset from the GRID s1 clips (10 utterances held out)"
[ -f "$DS/$NAME.mp4" ] || $PY scripts/grid_s1_dataset.py --source "$SRC" --out "$DS"

echo "== 2/7 preprocessing"
$PY data_utils/process.py "$DS/$NAME.mp4" --crop_sizes 168 --quiet

echo "== 3/7 SyncNet (held-out accuracy must beat chance clearly before it is used as a loss)"
[ -f "syncnet_ckpt/$NAME/best.pth" ] || \
  $PY syncnet_328.py --dataset_dir "$DS" --save_dir "syncnet_ckpt/$NAME" --size small --max_steps 1500 --seed "$SEED"

echo "== 4/7 U-Net (small: the default recipe 1500 + 360 + 9000 CPU s, adjacent-frame 8400, feature matching 5 x 4500 + 3000)"
COMMON=(--dataset_dir "$DS" --size small --epochs 1000 --ema --threads 2 --save_every 1000 --val_frames 32
        --lmd_frames 0 --seed "$SEED")
final() { $PY -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['checkpoint'])" "$1"; }
OMP_WAIT_POLICY=PASSIVE $PY train_328.py "${COMMON[@]}" --save_dir "checkpoint/${NAME}_start" --lr 2e-3 --cpu_budget_s 1500
OMP_WAIT_POLICY=PASSIVE $PY train_328.py "${COMMON[@]}" --save_dir "checkpoint/${NAME}_base" --lr 1e-3 --cpu_budget_s 360 \
  --init_checkpoint "$(final "checkpoint/${NAME}_start/metrics.jsonl")"
OMP_WAIT_POLICY=PASSIVE $PY train_328.py "${COMMON[@]}" --save_dir "checkpoint/$NAME" --lr 1e-3 --cpu_budget_s 9000 \
  --save_every 2 --init_checkpoint "$(final "checkpoint/${NAME}_base/metrics.jsonl")"
TEMPORAL=(--mouth_weight 4 --grad_weight 1 --gan_weight 0.05 --temporal_weight 1)
OMP_WAIT_POLICY=PASSIVE $PY train_328.py "${COMMON[@]}" --save_dir "checkpoint/${NAME}_temporal" --lr 5e-4 \
  --cpu_budget_s 8400 "${TEMPORAL[@]}" --init_checkpoint "$(final "checkpoint/$NAME/metrics.jsonl")"
FM=(--lr 2.5e-4 --mouth_weight 4 --grad_weight 2 --gan_weight 0.05 --gan_start 0
    --temporal_weight 1)
OMP_WAIT_POLICY=PASSIVE $PY train_328.py "${COMMON[@]}" --save_dir "checkpoint/${NAME}_fm" "${FM[@]}" --fm_weight 5 \
  --cpu_budget_s 4500 --init_checkpoint "$(final "checkpoint/${NAME}_temporal/metrics.jsonl")"
OMP_WAIT_POLICY=PASSIVE $PY train_328.py "${COMMON[@]}" --save_dir "checkpoint/${NAME}_fmc" "${FM[@]}" --fm_weight 5 \
  --cpu_budget_s 4500 --init_checkpoint "$(final "checkpoint/${NAME}_fm/metrics.jsonl")" --init_critic "checkpoint/${NAME}_fm/latest.pth"
OMP_WAIT_POLICY=PASSIVE $PY train_328.py "${COMMON[@]}" --save_dir "checkpoint/${NAME}_fmc10" "${FM[@]}" --fm_weight 10 \
  --cpu_budget_s 4500 --init_checkpoint "$(final "checkpoint/${NAME}_fmc/metrics.jsonl")" --init_critic "checkpoint/${NAME}_fmc/latest.pth"
# then as the shipped demo went on from fmc10 without its critic: a fresh critic warmed up for 500 batches,
# carried through two more stages (feature matching x10 for 4,500 and 3,000 CPU s, then x15 for 4,500)
OMP_WAIT_POLICY=PASSIVE $PY train_328.py "${COMMON[@]}" --save_dir "checkpoint/${NAME}_fmw" "${FM[@]}" --fm_weight 10 \
  --cpu_budget_s 4500 --init_checkpoint "$(final "checkpoint/${NAME}_fmc10/metrics.jsonl")" --critic_warmup 500
OMP_WAIT_POLICY=PASSIVE $PY train_328.py "${COMMON[@]}" --save_dir "checkpoint/${NAME}_fmwc" "${FM[@]}" --fm_weight 10 \
  --cpu_budget_s 3000 --init_checkpoint "$(final "checkpoint/${NAME}_fmw/metrics.jsonl")" \
  --init_critic "checkpoint/${NAME}_fmw/latest.pth"
OMP_WAIT_POLICY=PASSIVE $PY train_328.py "${COMMON[@]}" --save_dir "checkpoint/${NAME}_fmwc2" "${FM[@]}" --fm_weight 15 \
  --cpu_budget_s 4500 --init_checkpoint "$(final "checkpoint/${NAME}_fmwc/metrics.jsonl")" --init_critic "checkpoint/${NAME}_fmwc/latest.pth"
# and a last one in which every sample's audio window keeps only its 7 centre frames (--context_drop 1.0)
OMP_WAIT_POLICY=PASSIVE $PY train_328.py "${COMMON[@]}" --save_dir "checkpoint/${NAME}_ctx" "${FM[@]}" --fm_weight 15 \
  --cpu_budget_s 3000 --context_drop 1.0 --init_checkpoint "$(final "checkpoint/${NAME}_fmwc2/metrics.jsonl")" \
  --init_critic "checkpoint/${NAME}_fmwc2/latest.pth"
CKPT=$(final "checkpoint/${NAME}_ctx/metrics.jsonl")

echo "== 5/7 evaluation (held-out cross-reference; a Piper voice, espeak-ng and a female speaker)"
$PY - "$OUT" <<'PYEOF'
import sys
from synctalk.audio import write_wav
from synctalk.tts import EspeakTTS, PiperTTS
out = sys.argv[1]
text = ("Hello, I am the demo avatar. Type a sentence and I will say it. "
        "Silence keeps my mouth closed, and speech opens it again.")
write_wav(f"{out}/piper.wav", PiperTTS().synthesize(text).to_16k(), 16000)
write_wav(f"{out}/espeak.wav", EspeakTTS(voice="en-us+f3").synthesize(text).to_16k(), 16000)
PYEOF
FEMALE=../shared/media/audio/sadtalker_RD_Radio31_000.wav
AUDIO=("$OUT/piper.wav" "$OUT/espeak.wav")
[ -f "$FEMALE" ] && AUDIO+=("$FEMALE")
$PY evaluate.py --name "$NAME" --checkpoint "$CKPT" --audio "${AUDIO[@]}" --out "$OUT/eval"

echo "== 6/7 package -> demo_avatar/ (4 training utterances for the loop + the 10 held-out ones)"
$PY scripts/package_demo_avatar.py --source "$DS" --checkpoint "$CKPT" --name demo --idle_utterances 4 \
  --attribution "$ATTRIBUTION" --idle rendered --eval_dir "$OUT/eval" --out demo_avatar

echo "== 7/7 contact sheet -> docs/images/demo_contact_sheet.jpg"
SYNCTALK_PATHS__DATASET_ROOT=demo_avatar/dataset SYNCTALK_PATHS__CHECKPOINT_ROOT=demo_avatar/checkpoint \
  $PY scripts/contact_sheet.py --name demo --out docs/images/demo_contact_sheet.jpg
du -sh demo_avatar
