"""bench/server.py --quick end to end: two real servers (one stream at a time and the scheduler) on the
demo avatar, every kind at 1 and 2 streams, one JSON object with the schema docs/deployment.md describes."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

LEVEL_KEYS = {"streams", "served", "refused", "errors", "fps_min", "fps_median", "first_frame_p50_s",
              "first_frame_p95_s", "dropped", "repeated", "seconds", "cpu", "mean_batch"}
KINDS = ("text", "upload", "live")


def test_quick_concurrency_benchmark_reports_both_engines_and_refuses_past_capacity():
    run = subprocess.run([sys.executable, "server.py", "--quick", "--max_streams", "1", "--device", "cpu", "--table"],
                         cwd=REPO / "bench", capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["quick"] is True and report["config"]["streams"] == [1, 2]
    for name, batching in (("baseline", False), ("scheduler", True)):
        engine = report[name]
        assert engine["batching"] is batching and engine["engine"]["size"] == "small"
        assert engine["admission"]["capacity"] == 1
        for kind in KINDS:
            one, two = engine["levels"][kind]["1"], engine["levels"][kind]["2"]
            assert set(one) == LEVEL_KEYS and set(one["cpu"]) == {"server_cores", "system_busy", "client_cores",
                                                                  "loadavg_1m"}
            assert one["served"] == 1 and one["errors"] == {} and one["fps_min"] > 0
            assert 0 < one["first_frame_p50_s"] <= one["first_frame_p95_s"]
            # 2 streams on capacity 1: one refused; whether the other kept pace is up to the machine's load
            assert two["served"] + two["refused"] + sum(two["errors"].values()) == 2 and two["refused"] <= 1
        assert sum(engine["levels"][kind]["2"]["refused"] for kind in KINDS) >= 1
    assert set(report["ratios"]) == set(KINDS) and set(report["ratios"]["live"]["1"]) == {
        "served", "fps_min", "fps_median", "first_frame_p95_s"}
    assert set(report["goals"]) == {"streams_at_24fps", "first_frame_p95_4_over_1", "admission_at_8"}
    assert all(goal["pass"] is None for goal in report["goals"].values())  # 4 and 8 streams are not in --quick
    assert "| live | 2 |" in run.stderr  # the markdown table
