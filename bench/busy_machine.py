"""The default `moe train` job beside other busy processes: its slowdown against its quiet time.

    python bench/busy_machine.py [--rounds 3] [--steps 300] [--busy 2] [--settings moe,libraries]
    python bench/busy_machine.py --job [--rounds 2]        # the whole `moe train` command
    python bench/busy_machine.py --compare /work/main      # also another checkout (its .venv)

Every run is a fresh process (thread pools and environment read at start, as for a user).
Each round runs, for every setting, one quiet run and then one busy run: --busy processes
spinning `while True: pass` are started 0.5 s before the run and stopped after it. Alternating
makes drifts in the machine's other load hit both. A run times --steps training steps of the
default job after 20 warm-up steps (or, with --job, the whole `moe train` command: data,
baselines, training, evaluation, checkpoints, profile).

Settings (comma list; or any "KEY=VALUE KEY=VALUE" string in their place):
  moe        the environment as it is: moe applies its thread defaults (moe/threads.py)
  libraries  the libraries' own defaults: GOMP_SPINCOUNT=300000 OPENBLAS_THREAD_TIMEOUT=28
             (what libgomp and OpenBLAS do when nothing is set, i.e. before moe set anything)
  serial     OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 on top of moe's defaults
--compare CHECKOUT adds that checkout's code and build, as it is, to the alternation (with
CHECKOUT/.venv/bin/python if there is one, else this interpreter with CHECKOUT first on its
path, e.g. an extracted commit built with `setup.py build_ext --inplace`).

Prints every run, then per setting the median quiet and busy seconds, their ratio (the target
of issue 13: <= 2.2 with two busy processes on two cores) and the load averages seen.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SETTINGS = {
    "moe": "",
    "libraries": "GOMP_SPINCOUNT=300000 OPENBLAS_THREAD_TIMEOUT=28",
    "serial": "OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1",
}
WARMUP = 20


def worker(steps: int, root: str) -> None:
    """Time `steps` training steps of the default job in this process; print JSON."""
    sys.path.insert(0, root)
    import moe
    from moe.config import load_config
    from moe.datasets import load_source, source_of
    from moe.train import Trainer

    config = load_config(None, ["progress=false"])
    data = load_source(source_of(config.data))
    trainer = Trainer(config, data, "/nonexistent-not-written", save_checkpoints=False)
    for _ in range(WARMUP):
        trainer.train_step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    threads = getattr(moe, "threads", None)  # absent in checkouts before moe/threads.py
    print(json.dumps({"wall": wall, "cpu": cpu, "threads": threads.describe() if threads else "no moe.threads",
                      "os_threads": len(os.listdir("/proc/self/task"))}))


def parse_env(text: str) -> dict[str, str]:
    env = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"a setting must be KEY=VALUE words, got {item!r}")
        env[key] = value
    return env


def one_run(setting: str, args) -> dict:
    root, env_text = (setting, "") if setting == args.compare else (ROOT, SETTINGS.get(setting, setting))
    own = os.path.join(root, ".venv", "bin", "python")  # else this interpreter, with root's moe first
    python = own if root != ROOT and os.path.exists(own) else sys.executable
    env = {**os.environ, **parse_env(env_text)}
    if root != ROOT:  # root's moe before any installed one, also for the `moe` command (--job)
        env["PYTHONPATH"] = root
    if args.job:
        with tempfile.TemporaryDirectory(prefix="moe-busy-") as out:
            moe = os.path.join(os.path.dirname(python), "moe")
            t0 = time.perf_counter()
            subprocess.run([moe, "train", "--out", os.path.join(out, "run"), "--no-progress"], env=env,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return {"wall": time.perf_counter() - t0}
    r = subprocess.run([python, os.path.abspath(__file__), "--worker", "--root", root, "--steps", str(args.steps)],
                       env=env, check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def busy_run(setting: str, args) -> dict:
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        time.sleep(0.5)
        return one_run(setting, args)
    finally:
        for p in spinners:
            p.kill()
        for p in spinners:
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--busy", type=int, default=2, help="busy processes beside the busy runs")
    ap.add_argument("--settings", default="moe,libraries")
    ap.add_argument("--job", action="store_true", help="time the whole `moe train` command")
    ap.add_argument("--compare", help="another checkout to alternate with (its own .venv)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.steps, args.root)
        return
    names = [s.strip() for s in args.settings.split(",") if s.strip()] + ([args.compare] if args.compare else [])
    what = "the whole `moe train` job" if args.job else f"{args.steps} steps of the default job"
    print(f"{what}; {args.busy} busy processes; {os.cpu_count()} CPUs; load average {os.getloadavg()}")
    runs: dict[str, dict[str, list]] = {n: {"quiet": [], "busy": [], "load": []} for n in names}
    for r in range(args.rounds):
        for name in names:
            q = one_run(name, args)
            b = busy_run(name, args)
            load = os.getloadavg()[0]
            runs[name]["quiet"].append(q["wall"])
            runs[name]["busy"].append(b["wall"])
            runs[name]["load"].append(load)
            info = f", {q['threads']}, {q['os_threads']} OS threads" if "threads" in q else ""
            print(f"round {r + 1} [{name}] quiet {q['wall']:.2f} s, busy {b['wall']:.2f} s "
                  f"({b['wall'] / q['wall']:.2f}x), load {load:.2f}{info}", flush=True)
    print("\n| setting | quiet s (median) | busy s (median) | busy / quiet | worst round | load averages |")
    print("|---|---:|---:|---:|---:|---|")
    for name in names:
        q, b, loads = runs[name]["quiet"], runs[name]["busy"], runs[name]["load"]
        worst = max(bb / qq for qq, bb in zip(q, b, strict=True))
        print(f"| {name} | {statistics.median(q):.2f} | {statistics.median(b):.2f} | "
              f"{statistics.median(b) / statistics.median(q):.2f} | {worst:.2f} | "
              f"{min(loads):.1f}-{max(loads):.1f} |")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
