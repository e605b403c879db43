"""SyncTalk 2D library: everything the entry points (`api.py`, `train_328.py`, `inference_328.py`,
`evaluate.py`, `data_utils/process.py`) share. Data walks one way through it:

    audio / landmarks / face  ->  dataset  ->  trainkit (checkpoints)  ->  engine  ->  (services, api)

It never imports `config`, FastAPI or an entry script: callers pass settings in as arguments.
`timing` holds the data contract (16 kHz, 25 fps, 640 samples per frame, the 16-row window)."""
