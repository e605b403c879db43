"""The recipe study: train every arm on one dataset at the same CPU budget, evaluate each with the
cross-reference evaluation, and write one table.

    python train_328.py --dataset_dir dataset/grid_s1 --save_dir result/study/pretrain --size small \
        --cpu_budget_s 1500 --ema --lr 2e-3 --epochs 1000 --save_every 1000     # shared start (optional)
    python scripts/recipe_study.py --dataset_dir dataset/grid_s1 --syncnet syncnet_ckpt/grid_s1/best.pth \
        [--start_from result/study/pretrain] [--budget_s 360] [--out result/study] [--arms base,mouth]

One training at a time (the machine's cores belong to it). Each arm trains `train_328.py --size small
--cpu_budget_s BUDGET` into OUT/<arm>/ckpt (from the weights of the `--start_from` run when given, so
every arm gets the same shared start plus the same budget of its own), then `evaluate.py --references
closed,random` writes OUT/<arm>/eval/report.json. Arms already evaluated are skipped, so an interrupted
study resumes where it stopped. OUT/study.json holds every number; OUT/study.md the table for
docs/training-guide.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from synctalk.fileio import write_text_atomic

log = logging.getLogger("recipe_study")
REPO = Path(__file__).resolve().parents[1]

MOUTH = ["--mouth_weight", "4", "--grad_weight", "1"]
GAN = ["--gan_weight", "0.05"]
TEMPORAL = ["--temporal_weight", "1"]
SYNC = ["--use_syncnet", "--require_syncnet"]
# name -> (description, extra train_328.py flags); SyncNet arms get the checkpoint added
ARMS: dict[str, tuple[str, list[str]]] = {
    "base": ("today's recipe: L1 + 0.2 (1 - SSIM), random reference", []),
    "mouth": ("+ mouth region x4 in L1 and an image-gradient L1 term", MOUTH),
    "base+sync": ("today's recipe + SyncNet loss", SYNC),
    "mouth+sync": ("mouth + SyncNet loss", MOUTH + SYNC),
    "gan": ("mouth + patch critic on the mouth (hinge, from 25 % of the run)", MOUTH + GAN),
    "gan+sync": ("gan + SyncNet loss", MOUTH + GAN + SYNC),
    "temporal": ("gan + adjacent-frame term (pairs of consecutive frames)", MOUTH + GAN + TEMPORAL),
    "temporal+sync": ("temporal + SyncNet loss", MOUTH + GAN + TEMPORAL + SYNC),
    "mouth@nearest": ("mouth, reference = nearest head pose of 32 random frames", MOUTH + ["--reference", "nearest"]),
    "mouth@closed": ("mouth, reference = one of the 10 % most closed-mouth frames", MOUTH + ["--reference", "closed"]),
}
# (key, label) of the table; each for the closed and the random cross-reference run
TABLE_KEYS = [("psnr_crop", "PSNR"), ("ssim_crop", "SSIM"), ("lmd", "LMD"), ("opening_corr", "open. corr"),
              ("closure_in_silence", "closed in sil."), ("sharpness_ratio", "sharp."),
              ("mouth_texture_ratio", "inner detail"), ("teeth_share_ratio", "teeth share"), ("jitter_ratio", "jitter"),
              ("envelope_corr", "env. corr"), ("colour_step_excess", "colour step")]


def train_arm(arm: str, flags: list[str], args: argparse.Namespace, folder: Path) -> dict:
    """Train one arm (skipped when its final checkpoint exists); returns its cost figures."""
    ckpt = folder / "ckpt"
    cost_file = folder / "cost.json"
    if cost_file.is_file():
        return json.loads(cost_file.read_text())
    cmd = [sys.executable, str(REPO / "train_328.py"), "--dataset_dir", str(args.dataset_dir),
           "--save_dir", str(ckpt), "--size", "small", "--epochs", "1000", "--cpu_budget_s", str(args.budget_s),
           "--threads", str(args.threads), "--seed", str(args.seed), "--ema", "--lr", str(args.lr),
           "--val_frames", "32", "--lmd_frames", "0", "--save_every", "1000", *flags]
    if "--use_syncnet" in flags:
        cmd += ["--syncnet_checkpoint", str(args.syncnet)]
    if args.start_checkpoint:
        cmd += ["--init_checkpoint", str(args.start_checkpoint)]
    log.info("== %s: %s", arm, " ".join(cmd[1:]))
    wall = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    last = final_entry(ckpt)
    cost = {"train_cpu_s": last.get("train_cpu_s"), "steps": last["step"], "wall_s": time.perf_counter() - wall,
            "checkpoint": last.get("checkpoint")}
    write_text_atomic(cost_file, json.dumps(cost, indent=1))
    return cost


def final_entry(run_dir: Path) -> dict:
    """The last metrics.jsonl entry of a training folder (its final checkpoint and CPU seconds)."""
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])


def evaluate_arm(arm: str, cost: dict, args: argparse.Namespace, folder: Path) -> dict:
    """Cross-reference evaluation of the arm's final checkpoint; returns the report."""
    report = folder / "eval" / "report.json"
    if not report.is_file():
        cmd = [sys.executable, str(REPO / "evaluate.py"), "--name", args.dataset_dir.name,
               "--dataset_root", str(args.dataset_dir.parent), "--checkpoint", str(cost["checkpoint"]),
               "--references", "closed,random", "--max_frames", str(args.eval_frames), "--out", str(folder / "eval")]
        log.info("== %s: evaluating", arm)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(report.read_text())


def arm_row(arm: str, cost: dict, report: dict) -> dict:
    """The numbers of one arm: cost, verdict and each table key under both cross-references."""
    runs = {r["policy"]: r for r in report["self_reconstruction"]["runs"]}
    row = {"arm": arm, "description": ARMS[arm][0], **cost, "usable": report["verdict"]["usable"]}
    for policy in ("closed", "random"):
        for key, _ in TABLE_KEYS:
            row[f"{policy}:{key}"] = runs[policy]["model"].get(key)
            row[f"{policy}:copy:{key}"] = runs[policy]["copy_reference"].get(key)
    row["mean_crop"] = {k: report["self_reconstruction"]["mean_crop"].get(k) for k, _ in TABLE_KEYS}
    row["real"] = {k: report["self_reconstruction"]["real"].get(k) for k, _ in TABLE_KEYS}
    return row


def fmt(value: object) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], budget_s: float, start: dict | None) -> str:
    """The study table: one line per arm and reference run, then copy-reference, mean crop and real."""
    heads = ["arm", "ref.", *(label for _, label in TABLE_KEYS), "steps", "CPU s", "verdict"]
    shared = (f"after a shared start of {start['step']} steps / {start['train_cpu_s']:.0f} CPU s of today's recipe, "
              if start else "")
    lines = [f"Budget: {shared}{budget_s:g} CPU seconds of training steps per arm (small size, batch 8, EMA).", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in rows:
        for policy in ("closed", "random"):
            values = [fmt(row.get(f"{policy}:{k}")) for k, _ in TABLE_KEYS]
            lines.append("| " + " | ".join([row["arm"], policy, *values, str(row["steps"]),
                                            fmt(row["train_cpu_s"]), "OK" if row["usable"] else "UNUSABLE"]) + " |")
    if rows:
        first = rows[0]
        for policy in ("closed", "random"):
            values = [fmt(first.get(f"{policy}:copy:{k}")) for k, _ in TABLE_KEYS]
            lines.append("| " + " | ".join(["copy-reference", policy, *values, "", "", ""]) + " |")
        for name in ("mean_crop", "real"):
            values = [fmt(first[name].get(k)) for k, _ in TABLE_KEYS]
            lines.append("| " + " | ".join([name.replace("_", " "), "", *values, "", "", ""]) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", type=Path, default=REPO / "dataset" / "grid_s1")
    parser.add_argument("--syncnet", type=Path, default=REPO / "syncnet_ckpt" / "grid_s1" / "best.pth")
    parser.add_argument("--budget_s", type=float, default=360.0, help="CPU seconds of training per arm")
    parser.add_argument("--start_from", type=Path, default=None,
                        help="a finished train_328.py folder whose final weights every arm starts from")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of each arm")
    parser.add_argument("--out", type=Path, default=REPO / "result" / "study")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval_frames", type=int, default=300, help="held-out frames evaluated per arm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"error: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}", file=sys.stderr)
        return 2
    start = final_entry(args.start_from) if args.start_from else None
    args.start_checkpoint = start["checkpoint"] if start else None
    rows = []
    for arm in arms:
        folder = args.out / arm.replace("+", "_").replace("@", "_")
        cost = train_arm(arm, ARMS[arm][1], args, folder)
        rows.append(arm_row(arm, cost, evaluate_arm(arm, cost, args, folder)))
        write_text_atomic(args.out / "study.json", json.dumps({"budget_s": args.budget_s, "start": start,
                                                                "arms": rows}, indent=1))
        write_text_atomic(args.out / "study.md", markdown(rows, args.budget_s, start))
    print((args.out / "study.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
