#!/usr/bin/env bash
# Build the bundled demo avatar from nothing but the project's own tools, reproducibly from a seed:
# synthetic talking head (public-domain astronaut photo + Piper voice) -> preprocessing -> SyncNet ->
# small U-Net -> evaluation (training voice + an espeak-ng voice) -> package into demo_avatar/.
#
#   bash scripts/build_demo_avatar.sh [SEED] [SECONDS] [STEPS]
#
# CPU only is fine (about an hour on 2 cores); a GPU is used when present.
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${1:-7}
SECONDS_OF_VIDEO=${2:-150}
STEPS=${3:-1260}  # 3 epochs of 420 steps
PY=${PYTHON:-.venv/bin/python}
NAME=demo
DS=dataset/$NAME

echo "== 1/6 synthetic talking head (seed $SEED, ${SECONDS_OF_VIDEO} s)"
mkdir -p "$DS"
[ -f "$DS/$NAME.mp4" ] || $PY data_utils/synth_talker.py --out "$DS/$NAME.mp4" --seconds "$SECONDS_OF_VIDEO" --seed "$SEED"

echo "== 2/6 preprocessing"
$PY data_utils/process.py "$DS/$NAME.mp4" --crop_sizes 328,168 --quiet

echo "== 3/6 SyncNet"
$PY syncnet_328.py --dataset_dir "$DS" --save_dir "syncnet_ckpt/$NAME" --size small --max_steps 300 --seed "$SEED"

echo "== 4/6 U-Net (small)"
$PY train_328.py --dataset_dir "$DS" --save_dir "checkpoint/$NAME" --size small --epochs 40 --max_steps "$STEPS" \
  --batchsize 8 --lr 2e-3 --ema --save_every 1 --val_every 200 --seed "$SEED"

echo "== 5/6 evaluation (held-out self-reconstruction + an espeak-ng voice the model never heard)"
mkdir -p result/demo_build
$PY - <<'PYEOF'
from synctalk.audio import write_wav
from synctalk.tts import EspeakTTS
text = ("Hello, I am the demo avatar. Type a sentence and I will say it. "
        "Silence keeps my mouth closed, and speech opens it again.")
res = EspeakTTS(voice="en-us+f3").synthesize(text)
write_wav("result/demo_build/espeak_f3.wav", res.to_16k(), 16000)
PYEOF
$PY evaluate.py --name "$NAME" --audio result/demo_build/espeak_f3.wav

echo "== 6/6 package -> demo_avatar/"
$PY scripts/package_demo_avatar.py --name "$NAME" --checkpoint 3
