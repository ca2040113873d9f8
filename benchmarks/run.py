"""Run the benchmarks one after another, quick or full, and print every headline target in one table.

    python benchmarks/run.py --quick          # make bench: every target on smaller runs, ~7 minutes on 2 cores
    python benchmarks/run.py                  # make bench-full: the full runs behind README's figures (~an hour)
    python benchmarks/run.py --quick --only paging restore

Each script runs as its own subprocess, in order, with the system OpenBLAS preloaded where
there is one (MLX's wheel bundles a reference BLAS ~16x slower at prefill) and its own time
limit. A script that fails or runs past its limit is reported as such and the runner goes on;
the exit status is non-zero if any did. Each script writes its results JSON (a uniform list
under "targets": target, measured, goal, verdict) to benchmarks/results/ (full) or
benchmarks/results/quick/ (--quick, so quick runs leave the full runs' files alone; common.py
reads KVTRIE_BENCH_RESULTS); at the end one table: script, target, measured, goal, verdict,
then each script's wall time, the total, and the BLAS MLX ran on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field

HERE = pathlib.Path(__file__).resolve().parent
OPENBLAS = pathlib.Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")


@dataclass(frozen=True)
class Job:
    name: str  # the results file stem (benchmarks/results/NAME.json) and the table's label
    script: str
    full: tuple[str, ...]  # arguments of the full run (what make bench ran before --quick existed)
    quick: tuple[str, ...]  # arguments of the quick run
    full_limit_s: int
    quick_limit_s: int


# In make bench's order. Quick limits are 2-4x what each took on 2 busy cores (7.4 minutes in all).
JOBS = (
    Job("workloads", "workloads_bench.py", (), ("--quick",), 30 * 60, 120),
    Job("policy", "policy.py", (), ("--quick",), 20 * 60, 90),
    Job("paging", "paging.py", (), ("--quick",), 10 * 60, 60),
    Job("restore", "restore.py", (), ("--quick",), 40 * 60, 90),
    # the full 32-layer Llama-3.1-8B layout, 4k and 32k tokens (4 GiB a copy; ~16 GiB of memory at its peak);
    # --quick: 4k only (512 MiB a copy)
    Job("restore-32", "restore.py",
        ("--model", "llama", "--layers", "32", "--tokens", "4096", "32768", "--repeat", "3", "--phases-tokens", "4096",
         "--ttft-tokens", "1024", "--ttft-layers", "1", "--name", "restore-32"),
        ("--quick", "--model", "llama", "--layers", "32", "--tokens", "4096", "--name", "restore-32"), 40 * 60, 150),
    Job("scale", "scale.py", (), ("--quick",), 30 * 60, 60),
    Job("disk", "disk.py", (), ("--quick",), 10 * 60, 60),
    Job("hybrid", "hybrid.py", (), ("--quick",), 90 * 60, 300),
    Job("server", "server.py", (), ("--quick",), 40 * 60, 180),
    Job("memory", "memory.py", (), ("--quick",), 60 * 60, 180),
    # a coding agent (Qwen3's tokenizer, contexts past 16k, sub-agents, both APIs, reasoning stripping)
    Job("agent", "agent.py", (), ("--quick",), 30 * 60, 240),
    Job("shared", "shared.py", (), ("--quick",), 30 * 60, 180),
)


@dataclass
class Outcome:
    job: Job
    status: str = "not run"  # ok | failed (exit N) | timed out | no results
    wall_s: float = 0.0
    limit_s: float = 0.0
    targets: list[dict] = field(default_factory=list)
    blas: str | None = None
    tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def blas_env(env: dict[str, str]) -> tuple[dict[str, str], str]:
    """`env` with the system OpenBLAS preloaded where there is one, and a line saying what was done."""
    env = dict(env)
    preload = env.get("LD_PRELOAD", "")
    if "libopenblas" in preload:
        return env, f"LD_PRELOAD={preload} (as given)"
    if OPENBLAS.exists():
        env["LD_PRELOAD"] = f"{OPENBLAS} {preload}".strip()
        return env, f"LD_PRELOAD={OPENBLAS}"
    return env, "no system OpenBLAS: MLX runs on the reference BLAS of its wheel (apt-get install libopenblas0-pthread)"


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (servers the benchmarks start run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGINT first (the scripts' finally blocks stop their servers), then SIGKILL whatever is left of the tree."""
    tree = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def load_targets(path: pathlib.Path) -> tuple[list[dict], str | None]:
    data = json.loads(path.read_text())
    out = []
    for t in data.get("targets") or []:
        if isinstance(t, dict) and "verdict" in t:
            out.append({"target": t.get("target") or t.get("name") or "?", "measured": t.get("measured"),
                        "goal": t.get("goal", ""), "verdict": t["verdict"]})
    return out, (data.get("machine") or {}).get("blas")


def run_job(job: Job, quick: bool, results: pathlib.Path, env: dict[str, str], scale: float, log_dir: pathlib.Path) -> Outcome:
    out = Outcome(job, limit_s=scale * (job.quick_limit_s if quick else job.full_limit_s))
    cmd = [sys.executable, str(HERE / job.script), *(job.quick if quick else job.full)]
    shown = " ".join([f"benchmarks/{job.script}", *cmd[2:]])
    print(f"\n=== {job.name}: {shown} (limit {out.limit_s:.0f} s)", flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    json_path = results / f"{job.name}.json"
    start = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=HERE.parent, start_new_session=True)
    tail = bytearray()

    def pump() -> None:  # the script's output, as it comes, to our stdout and its log
        with open(log_dir / f"{job.name}.log", "wb") as log:
            while chunk := os.read(proc.stdout.fileno(), 1 << 16):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                log.write(chunk)
                tail.extend(chunk)
                del tail[:-8192]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(out.limit_s)
    except subprocess.TimeoutExpired:
        stop(proc)
        rc = None
    except KeyboardInterrupt:
        stop(proc)
        raise
    reader.join(10)
    out.wall_s = time.perf_counter() - t0
    out.tail = "\n".join(tail.decode(errors="replace").replace("\r", "\n").splitlines()[-15:])
    fresh = json_path.exists() and json_path.stat().st_mtime >= start
    if fresh:
        try:
            out.targets, out.blas = load_targets(json_path)
        except (ValueError, OSError) as e:
            out.tail += f"\n(unreadable {json_path}: {e})"
            fresh = False
    if rc is None:
        out.status = f"timed out after {out.limit_s:.0f} s"
    elif rc != 0:
        out.status = f"failed (exit {rc})"
    elif not fresh:
        out.status = f"no results ({json_path} not written)"
    else:
        out.status = "ok"
    return out


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (bool, int)):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def report(outcomes: list[Outcome], quick: bool, total_s: float, blas_line: str, results: pathlib.Path) -> None:
    rows = [(o.job.name, t) for o in outcomes for t in o.targets]
    width = 88
    gw = max([len(fmt(t["goal"])) for _, t in rows] + [4])
    print(f"\n{'=' * 40} targets ({'quick' if quick else 'full'} runs) {'=' * 40}")
    print(f"{'script':<11} {'target':<{width}} {'measured':>9} {'goal':<{gw}} verdict")
    for name, t in rows:
        lines = textwrap.wrap(t["target"], width) or [""]
        print(f"{name:<11} {lines[0]:<{width}} {fmt(t['measured']):>9} {fmt(t['goal']):<{gw}} {t['verdict']}")
        for more in lines[1:]:
            print(f"{'':<11} {more}")
    meets = sum(t["verdict"] == "meets" for _, t in rows)
    print(f"\n{meets} of {len(rows)} targets meet, {len(rows) - meets} fall short")
    print(f"\n{'script':<11} {'wall s':>7} {'limit s':>7} {'targets':>8}  status")
    for o in outcomes:
        met = sum(t["verdict"] == "meets" for t in o.targets)
        print(f"{o.job.name:<11} {o.wall_s:>7.1f} {o.limit_s:>7.0f} {f'{met}/{len(o.targets)}':>8}  {o.status}")
    print(f"{'total':<11} {total_s:>7.1f}   ({total_s / 60:.1f} minutes)")
    blas = sorted({o.blas for o in outcomes if o.blas})
    print(f"\nBLAS MLX ran on: {'; '.join(blas) or 'unknown (no results)'} ({blas_line})")
    print(f"results: {results}")
    for o in outcomes:
        if o.status not in ("ok", "not run"):
            print(f"\n{o.job.name}: {o.status}; last lines of its output:\n{textwrap.indent(o.tail, '  ')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="scripts: " + ", ".join(j.name for j in JOBS))
    p.add_argument("--quick", action="store_true", help="every script's --quick run (make bench); default: the full runs (make bench-full)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=[j.name for j in JOBS], help="run only these")
    p.add_argument("--skip", nargs="+", metavar="NAME", choices=[j.name for j in JOBS], default=[], help="leave these out")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiply every time limit (a slower machine)")
    p.add_argument("--results", default=None,
                   help="where the scripts write their JSON (default benchmarks/results, --quick: benchmarks/results/quick)")
    args = p.parse_args(argv)
    results = pathlib.Path(args.results or (HERE / "results" / "quick" if args.quick else HERE / "results")).resolve()
    results.mkdir(parents=True, exist_ok=True)
    env, blas_line = blas_env(os.environ)
    env["KVTRIE_BENCH_RESULTS"] = str(results)
    env.setdefault("PYTHONUNBUFFERED", "1")
    jobs = [j for j in JOBS if (not args.only or j.name in args.only) and j.name not in args.skip]
    print(f"{len(jobs)} benchmark(s), {'quick' if args.quick else 'full'} runs; {blas_line}; results in {results}")
    outcomes = []
    t0 = time.perf_counter()
    try:
        for job in jobs:
            outcomes.append(run_job(job, args.quick, results, env, args.limit_scale, results / "logs"))
    finally:
        report(outcomes, args.quick, time.perf_counter() - t0, blas_line, results)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
