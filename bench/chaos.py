"""Chaos campaign against `moe train --shards 2` and `moe shard serve` (figures: docs/RELIABILITY.md).

    python bench/chaos.py kills --runs 100        kill -9 a shard at uniformly random times
    python bench/chaos.py phases --runs 60        kill -9 a shard at a uniform time within a phase, phases in turn
    python bench/chaos.py coordinator --runs 20   kill -9 the coordinator, then `moe train --resume`
    python bench/chaos.py sigstop --runs 10       SIGSTOP a shard: how long until the run notices
    python bench/chaos.py giveup --runs 3         a shard killed again and again: one line, exit 3
    python bench/chaos.py fuzz --frames 1000000   fuzzed frames at a live shard: up, RSS growth
    python bench/chaos.py flood                   the issue's memory cases: a pipelined flood, a 750 MiB message
    python bench/chaos.py hijack                  a second local client against a live run
    python bench/chaos.py quick                   a handful of each (the CI form is tests/sharding/test_chaos.py)

Every run of a campaign is a real `moe train` process (a small model on the generated task
family: 2 tasks, 30 steps, E = 6, 2 MoE blocks, evaluations every 5 steps, checkpoints every
10, the final test evaluation and load profile), compared bit for bit with one uninterrupted
run: every dense parameter, optimizer state, data-order array and every expert row (weights,
Adam moments, step counts, by global id) of the final checkpoint, and the profile JSON. The
coordinator runs with the `moe.train` log at DEBUG and every stderr line timestamped, so each
kill is placed in the phase the trainer was in (the last `phase ...` record before it).
Results are appended as JSON lines to --out (default bench/chaos-results.jsonl) and summed up.
Run the long campaigns under the shared CPU lock: `flock -s /tmp/moe-cpu.lock python bench/chaos.py ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from moe import checkpoint as ckpt  # noqa: E402
from moe.experts import state  # noqa: E402
from moe.processes import pid_alive  # noqa: E402
from moe.profile_model import computed_profile  # noqa: E402

STEPS = 30
OVERRIDES = ["model.d_model=16", "model.n_experts=6", "model.d_hidden=16", "model.n_layers=2", "model.k=2",
             f"train.steps={STEPS}", "train.batch_size=64", "train.checkpoint_every=10", "train.eval_every=5",
             "train.warmup=5", "train.keep_last=10", "train.baseline=false", "data.n_family=2", "data.n_skills=0", "data.n_digit_sets=0",
             "data.family_size=200", "data.builtin=false"]
# The coordinator: `moe train` itself (moe.cli.main), with its trainer's phases logged and
# every stderr line stamped with the wall clock, so a kill can be placed in its phase. With
# MOE_CHAOS_AIMS (a JSON list of {"phase", "nth", "offset"}) it also kills one of its own shards
# (drawn with MOE_CHAOS_SEED) `offset` seconds after the trainer enters `phase` for the nth time
# (0-based): aimed from inside, so phases of a few milliseconds can be hit. An aim with
# "signal": "STOP" sends SIGSTOP instead.
HARNESS = r"""
import json, logging, os, random, signal, sys, threading, time
class Stamped:
    def __init__(self, out): self.out, self.buf, self.lock = out, "", threading.Lock()
    def write(self, s):
        with self.lock:
            self.buf += s
            while "\n" in self.buf:
                line, self.buf = self.buf.split("\n", 1)
                self.out.write(f"{time.time():.6f} {line}\n"); self.out.flush()
        return len(s)
    def flush(self): self.out.flush()
sys.stderr = Stamped(sys.stderr)
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
logging.getLogger("moe.train").setLevel(logging.DEBUG)
AIMS = json.loads(os.environ.get("MOE_CHAOS_AIMS", "[]"))
if AIMS:
    sys.setswitchinterval(1e-4)  # the timer thread gets the GIL within 0.1 ms
    pick = random.Random(int(os.environ.get("MOE_CHAOS_SEED", "0")))
    def shards():
        me, out = os.getpid(), []
        for d in os.listdir("/proc"):
            try:
                f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(f[1]) == me and f[0] != "Z":
                out.append(int(d))
        return sorted(out)
    def kill(sig="KILL"):
        pids = shards()
        if pids:
            pid = pick.choice(pids)
            os.kill(pid, getattr(signal, "SIG" + sig))
            sys.stderr.write(f"chaos {'stopped' if sig == 'STOP' else 'killed'} {pid}\n")
    class Aim(logging.Handler):
        seen = {}
        def emit(self, record):
            text = record.getMessage()
            for a in AIMS:
                if text.startswith(f"phase {a['phase']} at step"):
                    n = self.seen[a["phase"]] = self.seen.get(a["phase"], -1) + 1
                    if n == a["nth"] and a["offset"] > 0:
                        timer = threading.Timer(a["offset"], kill, [a.get("signal", "KILL")])
                        timer.daemon = True  # an aim past the end of the run never fires
                        timer.start()
                    elif n == a["nth"]:
                        kill(a.get("signal", "KILL"))  # at once, before the phase sends anything
    logging.getLogger().addHandler(Aim(logging.DEBUG))  # after the record is written (and stamped)
from moe.cli import main
sys.exit(main(sys.argv[1:]))
"""
PHASE = re.compile(r"^(\d+\.\d+) moe\.train phase (.+) at step (\d+)$")
HARNESS_KILL = re.compile(r"^(\d+\.\d+) chaos killed (\d+)$")
HARNESS_STOP = re.compile(r"^(\d+\.\d+) chaos stopped (\d+)$")
FAILED = re.compile(r"^(\d+\.\d+) (.+) failed: (.*); rolling back to (.+)$")


# ----------------------------------------------------------------------------- running moe train


def task_file(folder: Path) -> Path:
    """The generated family as a task file (so every run reads the same CSVs)."""
    from moe.tasks.family import make_family

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for d in make_family(2, 200, seed=0):
        x = np.concatenate([d.x_train, d.x_val, d.x_test])
        y = np.concatenate([d.y_train, d.y_val, d.y_test]).reshape(len(x))
        cols = [f"f{i}" for i in range(x.shape[1])]
        rows = "\n".join(",".join(f"{v:.9g}" for v in r) + f",{int(t)}" for r, t in zip(x, y, strict=True))
        (folder / f"{d.name}.csv").write_text(",".join(cols) + ",y\n" + rows + "\n")
        lines.append(f'[[task]]\nname = "{d.name}"\npath = "{d.name}.csv"\ntarget = "y"\nkind = "{d.spec.kind}"\n')
    (folder / "tasks.toml").write_text("\n".join(lines))
    return folder / "tasks.toml"


class Run:
    """One `moe train` process; its stderr is read by a thread into timestamped lines."""

    def __init__(self, out: Path, tasks: Path, *, shards: int = 2, resume: bool = False, extra=(),
                 aims: list[dict] | None = None, seed: int = 0) -> None:
        args = ["train", "--out", str(out), "--no-progress", "--json", *OVERRIDES, f"data.task_file={tasks}",
                *extra]
        if shards:
            args[1:1] = ["--shards", str(shards)]
        if resume:
            args.insert(1, "--resume")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        if aims:
            env.update(MOE_CHAOS_AIMS=json.dumps(aims), MOE_CHAOS_SEED=str(seed))
        self.started = time.time()
        self.p = subprocess.Popen([sys.executable, "-c", HARNESS, *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.first_shard: float | None = None
        self.ended: float | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.p.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait(self, timeout: float = 900) -> int:
        rc = self.p.wait(timeout=timeout)
        self.ended = time.time()
        self.reader.join(timeout=30)
        self.stdout = self.p.stdout.read()
        return rc

    def shard_pids(self) -> list[int]:
        return children(self.p.pid)

    def first_shard_pids(self) -> list[int]:
        """Wait until a shard process exists (its start time is kept); [] when the run ended first."""
        pids = self.shard_pids()
        while not pids and self.p.poll() is None:
            time.sleep(0.002)
            pids = self.shard_pids()
        if pids and self.first_shard is None:
            self.first_shard = time.time()
        return pids

    def phase_at(self, t: float) -> tuple[str, int | None]:
        phase, step = "launch", None  # before the trainer's first phase: shards starting, READY
        for line in list(self.lines):
            m = PHASE.match(line)
            if m and float(m.group(1)) <= t:
                phase, step = m.group(2), int(m.group(3))
        return phase, step

    def records(self) -> list[tuple[float, str, int]]:
        """The trainer's phase records so far: (time, phase, step)."""
        return [(float(m.group(1)), m.group(2), int(m.group(3))) for m in map(PHASE.match, list(self.lines)) if m]

    def harness_kills(self) -> list[dict]:
        """The kills the harness made (aims), as _kill notes them."""
        return [{"at": float(m.group(1))} for m in map(HARNESS_KILL.match, self.lines) if m]

    def shard_logs(self, out: Path, lines: int = 6) -> dict[str, list[str]]:
        """The last lines of each shard's log (kept in a failed run's row)."""
        logs = sorted((out / "shards").glob("shard-*.log")) if (out / "shards").is_dir() else []
        return {p.name: p.read_text(errors="replace").splitlines()[-lines:] for p in logs}

    def last_line(self) -> str | None:
        """The final stderr line without its stamp (the one-line error of a failed run)."""
        return self.lines[-1].split(" ", 1)[-1] if self.lines else None

    def failures(self) -> list[tuple[float, str]]:
        return [(float(m.group(1)), m.group(2)) for m in map(FAILED.match, self.lines) if m]


def windows(run: Run) -> dict[str, list[float]]:
    """How long each occurrence of each phase lasted in a finished run (the nth entry of a
    phase is its nth occurrence); 'launch' is from the first shard's start to the first record."""
    recs = run.records()
    ends = [t for t, _, _ in recs[1:]] + [run.ended]
    out: dict[str, list[float]] = {"launch": [recs[0][0] - run.first_shard]} if recs and run.first_shard else {}
    for (t, phase, _), end in zip(recs, ends, strict=True):
        out.setdefault(phase, []).append(end - t)
    return out


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return sorted(out)


def launch_folders(pids: list[int]) -> list[str]:
    """The shard launch folders of these coordinators (named moe-shards-PID-*) still on disk."""
    tmp = Path(tempfile.gettempdir())
    return sorted(p.name for pid in pids for p in tmp.glob(f"moe-shards-{pid}-*"))


# ----------------------------------------------------------------------------- comparing runs


def final_state(out: Path) -> dict[str, np.ndarray]:
    where = ckpt.list_checkpoints(out / "checkpoints")[-1]
    manifest, files, _ = ckpt.load_checkpoint(where)
    flat = {f"{k}/{n}": v for k, t in files.items() for n, v in t.items()}
    layers = {e["layer"] for e in manifest["files"].values() if e.get("kind") == "experts"}
    E = manifest["config"]["model"]["n_experts"]
    for layer in sorted(layers):
        for n, v in state.read_rows(where, manifest["files"], layer, np.arange(E)).items():
            flat[f"experts-l{layer}/{n}"] = v
    flat["step"] = np.array(manifest["step"])
    flat["profile"] = np.frombuffer(json.dumps(computed_profile(out / "profile" / "profile.json"),
                                               sort_keys=True).encode(), dtype=np.uint8)
    return flat


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """The names whose bits differ (empty: identical)."""
    diff = sorted(set(a) ^ set(b))
    diff += [k for k in sorted(set(a) & set(b)) if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
    return diff


class Campaign:
    """The runs of one invocation: their folders under `work` (a fresh temp folder by default,
    removed at the end), the uninterrupted reference, and the result rows."""

    def __init__(self, args, work: Path | None = None) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="moe-chaos-")) if work is None else Path(work)
        self.tasks = task_file(self.work / "tasks")
        self.results = Path(args.out)
        self.rows: list[dict] = []
        self._reference: tuple[dict, float] | None = None

    def reference(self) -> tuple[dict, float]:
        """The uninterrupted sharded run: its final state and wall time."""
        if self._reference is None:
            out = self.work / "reference"
            run = self.reference_run = Run(out, self.tasks)
            run.first_shard_pids()
            rc = run.wait()
            duration = time.time() - run.started
            if rc != 0:
                raise SystemExit("the uninterrupted reference run failed:\n" + "\n".join(run.lines[-20:]))
            inproc = self.work / "reference-inproc"
            rc = Run(inproc, self.tasks, shards=0).wait()
            ref = final_state(out)
            if rc != 0 or same(ref, final_state(inproc)):
                raise SystemExit("the sharded reference run differs from the in-process one")
            self._reference = (ref, duration)
        return self._reference

    def record(self, kind: str, row: dict) -> None:
        row = {"kind": kind, "time": time.time(), "load": os.getloadavg()[0], **row}
        with open(self.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def out(self, name: str) -> Path:
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        return out


# ----------------------------------------------------------------------------- campaigns


def kill_shards(c: Campaign, runs: int, rng: random.Random) -> None:
    """kill -9 of a shard at a uniformly random time of the shards' working life (from the first
    shard's start until the run's last use of the experts, the end of the profile, as long as in
    the uninterrupted run; the idle tail after it is a phase of its own in kill_in_phases); one
    run in four gets a second kill within 3 s of the first (to land in the recovery)."""
    ref, _ = c.reference()
    ref_run = c.reference_run
    life = [t for t, phase, _ in ref_run.records() if phase == "profile done"][-1] - ref_run.first_shard
    for i in range(runs):
        out = c.out(f"kill-{i}")
        run = Run(out, c.tasks)
        when = [rng.uniform(0, life)]
        if rng.random() < 0.25:
            when.append(when[0] + rng.uniform(0.05, 3.0))
        kills: list[dict] = []
        run.first_shard_pids()
        for t in when:
            while run.first_shard is not None and time.time() < run.first_shard + t and run.p.poll() is None:
                time.sleep(0.001)
            _kill(run, rng, kills)
        rc = run.wait()
        diff = same(final_state(out), ref) if rc == 0 else ["(no result)"]
        c.record("kill", {"run": i, "kills": placed(run, kills), "exit": rc, "identical": not diff, "differs": diff[:5],
                          "failures": [f for _, f in run.failures()], "seconds": round(time.time() - run.started, 1),
                          "restarted_before_ready": sum("before it was ready" in line or "before the run began" in line
                                                        for line in run.lines),
                          "error": run.last_line() if rc else None,
                          "shard_logs": run.shard_logs(out) if rc else None})


SHORT_PHASE_S = 0.05
TARGETS = ("launch", "start", "checkpoint save", "step", "evaluation", "final evaluation", "profile", "load",
           "rollback", "profile done")  # the last: after the experts' last use (the report, stopping the shards)


def kill_in_phases(c: Campaign, runs: int, rng: random.Random) -> None:
    """Each run aims one kill -9 at a phase (the phases in turn): an occurrence of it drawn
    uniformly from the uninterrupted run, and a time drawn uniformly within that occurrence's
    duration there (for occurrences shorter than SHORT_PHASE_S, at its very start); the
    coordinator itself kills the shard (HARNESS), so phases of a few milliseconds are hit. 'launch' (seconds long, before the trainer logs anything) is aimed
    from outside, from the first shard's start. 'load' is a `--resume` from the checkpoint of
    step 10; 'rollback' kills a second shard inside the rollback that follows a kill at the
    start of step 16. Each kill is then placed in the phase it really landed in."""
    ref, _ = c.reference()
    base = windows(c.reference_run)
    resumable = c.work / "stopped-at-10"
    if not resumable.exists():
        first = Run(resumable, c.tasks, extra=["--stop-at", "10"])
        if first.wait() != 0:
            raise SystemExit("the run to resume from failed:\n" + "\n".join(first.lines[-20:]))
    calibrations = {"load": _calibrate(c, "load", resumable), "rollback": _calibrate(c, "rollback", resumable)}
    for i in range(runs):
        target = TARGETS[i % len(TARGETS)]
        out = c.out(f"phase-{i}")
        lengths = calibrations.get(target) or base[target]
        nth = rng.randrange(len(lengths))
        # a timer cannot aim inside a phase of a few ms on a loaded machine: kill on entering it
        offset = rng.uniform(0, lengths[nth]) if lengths[nth] >= SHORT_PHASE_S else 0.0
        if target == "load":
            shutil.copytree(resumable, out)
        aims = [] if target == "launch" else [{"phase": target, "nth": nth, "offset": offset}]
        if target == "rollback":
            aims.insert(0, {"phase": "step", "nth": 15, "offset": 0.0})
        run = Run(out, c.tasks, resume=target == "load", aims=aims, seed=rng.randrange(1 << 30))
        kills: list[dict] = []
        if target == "launch" and run.first_shard_pids():
            while time.time() < run.first_shard + offset and run.p.poll() is None:
                time.sleep(0.001)
            _kill(run, rng, kills)
        rc = run.wait()
        kills += run.harness_kills()
        diff = same(final_state(out), ref) if rc == 0 else ["(no result)"]
        c.record("phase", {"run": i, "target": target, "occurrence": nth, "offset_s": round(offset, 4),
                           "kills": placed(run, kills), "exit": rc, "identical": not diff, "differs": diff[:5],
                           "failures": [f for _, f in run.failures()], "seconds": round(time.time() - run.started, 1),
                           "error": run.last_line() if rc else None,
                           "shard_logs": run.shard_logs(out) if rc else None})


def _calibrate(c: Campaign, what: str, resumable: Path) -> list[float]:
    """Durations of the 'load' phase of an uninterrupted resume, or of the rollback after a kill."""
    out = c.out(f"calibrate-{what}")
    if what == "load":
        shutil.copytree(resumable, out)
    aims = [{"phase": "step", "nth": 15, "offset": 0.0}] if what == "rollback" else None
    run = Run(out, c.tasks, resume=what == "load", aims=aims)
    if run.wait() != 0:
        raise SystemExit(f"the {what} calibration run failed:\n" + "\n".join(run.lines[-20:]))
    return windows(run)[what]


def _kill(run: Run, rng: random.Random, kills: list[dict]) -> None:
    """kill -9 one of the run's shards (drawn at random); note when and in which phase."""
    pids = run.shard_pids()
    if run.p.poll() is not None or not pids:
        kills.append({"at_s": round(time.time() - run.started, 3), "phase": "after the run"})
        return
    at = time.time()
    os.kill(rng.choice(pids), signal.SIGKILL)
    kills.append({"at": at})  # placed in its phase once every record of the run has been read


def placed(run: Run, kills: list[dict]) -> list[dict]:
    """The kills with their time into the run and the phase the trainer was in (after run.wait())."""
    out = []
    for k in kills:
        if "at" not in k:
            out.append(k)
            continue
        phase, step = run.phase_at(k["at"])
        out.append({"at_s": round(k["at"] - run.started, 3), "phase": phase, "step": step})
    return out


def kill_coordinator(c: Campaign, runs: int, rng: random.Random) -> None:
    """kill -9 of the coordinator at a uniformly random time, then `moe train --resume` (or a fresh
    start when no checkpoint was committed): the same bits, no orphans, no stale folders kept."""
    ref, duration = c.reference()
    for i in range(runs):
        out = c.out(f"coord-{i}")
        run = Run(out, c.tasks)
        t = rng.uniform(0, duration)
        while time.time() < run.started + t and run.p.poll() is None:
            time.sleep(0.005)
        shards = run.shard_pids()
        at = time.time()
        over = run.p.poll() is not None
        if not over:
            os.kill(run.p.pid, signal.SIGKILL)
        run.wait()
        phase, step = ("after the run", None) if over else run.phase_at(at)
        deadline = time.time() + 60
        while any(pid_alive(p) for p in shards) and time.time() < deadline:
            time.sleep(0.05)
        orphans = [p for p in shards if pid_alive(p)]
        stale = [p.name for p in (out / "checkpoints").glob(".step-*.tmp-*")] if (out / "checkpoints").exists() else []
        resumed = bool(ckpt.list_checkpoints(out / "checkpoints"))
        again = Run(out, c.tasks, resume=resumed)
        rc = again.wait()
        left = [p.name for p in (out / "checkpoints").glob(".step-*.tmp-*")]
        diff = same(final_state(out), ref) if rc == 0 else ["(no result)"]
        c.record("coordinator", {"run": i, "at_s": round(at - run.started, 3), "phase": phase, "step": step,
                                 "resumed": resumed, "exit": rc, "identical": not diff, "differs": diff[:5],
                                 "orphans": orphans, "stale_tmp_after_kill": len(stale),
                                 "stale_tmp_after_resume": len(left),
                                 "launch_folders_left": launch_folders([run.p.pid, again.p.pid]),
                                 "error": again.last_line() if rc else None})


def sigstop(c: Campaign, runs: int, rng: random.Random) -> None:
    """SIGSTOP a shard at the start of a training step drawn uniformly (sent from inside the
    coordinator, HARNESS, so it lands in training however loaded the machine is; default
    deadline 5 s, heartbeat 1 s): the time from the signal to the coordinator's failure line;
    the run must then complete, bit-identical."""
    ref, _ = c.reference()
    for i in range(runs):
        out = c.out(f"stop-{i}")
        nth = rng.randrange(STEPS)
        run = Run(out, c.tasks, aims=[{"phase": "step", "nth": nth, "offset": 0.0, "signal": "STOP"}],
                  seed=rng.randrange(1 << 30))
        rc = run.wait()
        stops = [float(m.group(1)) for m in map(HARNESS_STOP.match, run.lines) if m]
        at = stops[0] if stops else None
        phase, step = run.phase_at(at) if at is not None else ("never stopped", None)
        seen = [t for t, _ in run.failures() if at is not None and t >= at]
        diff = same(final_state(out), ref) if rc == 0 else ["(no result)"]
        why = [m.group(3) for m in map(FAILED.match, run.lines) if m][:1]
        how = None if not why else "heartbeats" if "missed heartbeats" in why[0] else \
            "deadline" if "deadline" in why[0] else why[0][:120]
        c.record("sigstop", {"run": i, "aimed_step": nth, "phase": phase, "step": step, "detected_after_s":
                             round(seen[0] - at, 3) if seen else None, "exit": rc, "identical": not diff,
                             "failure": run.failures()[0][1] if run.failures() else None, "detected_by": how})


def give_up(c: Campaign, runs: int, rng: random.Random) -> None:
    """A shard killed each time it comes back: after shards.max_failures (3) the run gives up
    with one line and exit status 3."""
    for i in range(runs):
        run = Run(c.out(f"giveup-{i}"), c.tasks)
        killed = set()
        while run.p.poll() is None:
            if run.phase_at(time.time())[0] in ("step", "rollback", "start", "checkpoint save"):
                for pid in run.shard_pids()[-1:]:
                    if pid not in killed:
                        killed.add(pid)
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        rc = run.wait()
        texts = [line.split(" ", 1)[1] for line in run.lines]
        final = [t for t in texts if t.startswith("moe train:")][-1:]
        c.record("giveup", {"run": i, "exit": rc, "kills": len(killed), "final_line": final[0] if final else None,
                            "tracebacks": sum("Traceback" in t for t in texts),
                            "seconds": round(time.time() - run.started, 1)})


def _serve(secret_file: Path, d_model: int = 8) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "moe.sharding.serve", "--bind", "tcp://127.0.0.1:*", "--experts", "0-3",
           "--layers", "1", "--d-model", str(d_model), "--d-hidden", "8", "--run", "fuzz-run", "--secret-file",
           str(secret_file), "--log-level", "ERROR"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = p.stdout.readline().split()
    return p, line[1]


def _peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def flood(c: Campaign, rng: random.Random) -> None:
    """The issue's memory cases against a live `moe shard serve`: 48 pipelined 8 MiB forwards from
    the coordinator's (admitted) link, and a 750 MiB message in 3 frames, from a connection without
    the transport password and from an admitted link. Peak (VmHWM) and after (VmRSS) growth."""
    sys.path.insert(0, str(ROOT / "tests"))
    from shardkit import admitted, dealer, header, reply, rss_bytes

    from moe.sharding import session

    secret = session.new_secret()
    D = 64
    p, endpoint = _serve(session.write_secret(c.work / "flood.secret", secret), d_model=D)
    try:
        link = admitted(endpoint, secret, "fuzz-run")
        rows = (8 << 20) // (4 * D)
        x = np.ones((rows, D), dtype=np.float32).tobytes()

        def forward(seq: int) -> list:
            return [header("forward", "fuzz-run", seq=seq, experts=[0], offsets=[0, rows],
                           arrays=[{"dtype": "<f4", "shape": [rows, D]}]), x]

        def settled() -> int:
            """RSS once the shard has finished with what came before (a ping answered after it)."""
            link.send(header("ping", "fuzz-run", seq=next(pings)))
            reply(link, 60.0)
            return rss_bytes(p.pid)

        pings = iter(range(7000, 8000))
        for seq in (10, 11):  # warm up
            link.send_multipart(forward(seq))
            reply(link, 60.0)
        base = rss_bytes(p.pid)
        _reset_peak(p.pid)
        for i in range(48):
            link.send_multipart(forward(100 + i))
        kinds = [(m.header.op if m.header.op == "ok" else m.header.meta["code"]) if m is not None else "none"
                 for m in (reply(link, 120.0) for _ in range(48))]
        row = {"pipelined_8mib_forwards": 48, "answers": {k: kinds.count(k) for k in set(kinds)},
               "peak_growth_mb": round((_peak(p.pid) - base) / 2**20, 1),
               "after_growth_mb": round((settled() - base) / 2**20, 1)}
        big = [np.zeros((250 << 20) // 4, dtype=np.float32) for _ in range(3)]  # 750 MiB in 3 frames
        for who, sock in (("no password", dealer(endpoint, None)), ("admitted", link)):
            base = rss_bytes(p.pid)
            _reset_peak(p.pid)
            try:
                sock.send_multipart([header("ping", "fuzz-run", seq=5000), *big], flags=1, copy=False)
            except Exception:  # noqa: BLE001 - zmq.Again: not connected, nothing is even queued
                pass
            got = reply(sock, 60.0 if who == "admitted" else 3.0)
            row[f"750mib_3_frames_{who.replace(' ', '_')}"] = {
                "reply": None if got is None else (got.header.op if got.header.op != "error"
                                                   else got.header.meta["code"]),
                "peak_growth_mb": round((_peak(p.pid) - base) / 2**20, 1),
                "after_growth_mb": round((settled() - base) / 2**20, 1)}
            if sock is not link:
                sock.close(linger=0)
        del big
        link.send(header("ping", "fuzz-run", seq=6000))
        row["alive"] = p.poll() is None and reply(link, 30.0) is not None
        link.close(linger=0)
        c.record("flood", row)
    finally:
        p.terminate()
        p.wait(timeout=30)


def fuzz(c: Campaign, frames: int, rng: random.Random) -> None:
    """Random bytes and mutations of valid messages, from an admitted link (they reach the
    decoder and the server's logic), from a link past the transport but not admitted, and raw
    TCP noise. The shard must stay up; RSS growth after the warm-up must stay under 10 MB."""
    sys.path.insert(0, str(ROOT / "tests"))
    from shardkit import admitted, dealer, header, rss_bytes, transport_password

    from moe.sharding import session, wire

    secret = session.new_secret()
    secret_file = session.write_secret(c.work / "fuzz.secret", secret)
    p, endpoint = _serve(secret_file)
    try:
        link = admitted(endpoint, secret, "fuzz-run")
        stranger = dealer(endpoint, transport_password(secret))
        valid = _valid_messages()
        sent = replies = 0
        counts: dict[str, int] = {}

        def drain(sock, want: int) -> int:
            got = 0
            while got < want and sock.poll(2000):
                msg = sock.recv_multipart()
                got += 1
                try:
                    h = wire.decode(msg).header
                    key = h.op if h.op != "error" else h.meta["code"]
                except Exception:  # noqa: BLE001
                    key = "undecodable"
                counts[key] = counts.get(key, 0) + 1
            return got

        def one(sock) -> int:
            kind = rng.random()
            if kind < 0.3:  # random bytes, 1-4 frames
                msg = [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(1, 5))]
            else:  # a valid message, mutated
                msg = [bytearray(f) for f in rng.choice(valid)]
                for _ in range(rng.randrange(1, 6)):
                    f = rng.randrange(len(msg))
                    how = rng.random()
                    if how < 0.5 and msg[f]:
                        msg[f][rng.randrange(len(msg[f]))] = rng.randrange(256)
                    elif how < 0.7:
                        msg[f] = msg[f][: rng.randrange(len(msg[f]) + 1)]
                    elif how < 0.85:
                        msg[f] += rng.randbytes(rng.randrange(1, 16))
                    else:
                        msg.append(bytearray(rng.randbytes(rng.randrange(0, 64))))
                msg = [bytes(f) for f in msg]
            sock.send_multipart(msg)
            return len(msg)

        warm = 20_000
        frames_sent = 0
        t0 = time.time()
        rss0 = None
        while frames_sent < frames + warm:
            sock = link if rng.random() < 0.8 else stranger
            batch = 0
            for _ in range(200):
                frames_sent += one(sock)
                batch += 1
            sent += batch
            replies += drain(sock, batch)
            if rss0 is None and frames_sent >= warm:
                rss0 = rss_bytes(p.pid)
            if frames_sent % 100_000 < 1000:
                host, port = endpoint[len("tcp://"):].rsplit(":", 1)
                noise = socket.create_connection((host, int(port)))
                try:
                    noise.sendall(rng.randbytes(1 << 16))
                except OSError:
                    pass
                noise.close()
        rss1 = rss_bytes(p.pid)
        link.send(header("ping", "fuzz-run", seq=1 << 50))
        ok = link.poll(10_000) and link.recv_multipart() is not None
        c.record("fuzz", {"frames": frames_sent - warm, "messages": sent, "replies": replies, "alive": p.poll() is None
                          and bool(ok), "rss_before_mb": round(rss0 / 2**20, 1), "rss_after_mb": round(rss1 / 2**20, 1),
                          "rss_growth_mb": round((rss1 - rss0) / 2**20, 2), "codes": counts,
                          "seconds": round(time.time() - t0, 1)})
        link.close(linger=0)
        stranger.close(linger=0)
    finally:
        p.terminate()
        p.wait(timeout=30)


def _valid_messages() -> list[list[bytes]]:
    from moe.sharding import wire
    from moe.sharding.wire import Header

    rows = np.ones((3, 8), dtype=np.float32)
    out = []
    for h, arrays in [
        (Header(op="forward", run="fuzz-run", gen=0, experts=(0, 2), offsets=(0, 2, 3)), [rows]),
        (Header(op="backward", run="fuzz-run", gen=0, experts=(0, 2), offsets=(0, 2, 3)), [rows]),
        (Header(op="update", run="fuzz-run", gen=0, step=1, meta={"lr": 0.1, "scale": 1.0}), []),
        (Header(op="stats", run="fuzz-run", gen=0), []),
        (Header(op="ping", run="fuzz-run", gen=0, meta={"t": 1.0}), [rows]),
        (Header(op="save", run="fuzz-run", gen=0, meta={"dir": "/nonexistent", "tag": "l0"}), []),
        (Header(op="load", run="fuzz-run", gen=0, meta={"dir": "/nonexistent", "tag": "l0", "files": [],
                                                        "sha256": []}), []),
        (Header(op="hello", run="fuzz-run", gen=0, meta={"nonce": "0" * 64}), []),
        (Header(op="auth", run="fuzz-run", gen=0, meta={"proof": "0" * 64}), []),
    ]:
        out.append([bytes(f) for f in wire.encode(h, arrays)])
    return out


def hijack(c: Campaign, rng: random.Random) -> None:
    """A second local client attacking a live `moe train --shards 2 shards.transport=tcp`: it can
    read nothing, change nothing, stop nothing, and the run ends bit-identical, unslowed by it
    (no deadline missed, no rollback)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from shardkit import dealer, header, reply

    ref, _ = c.reference()
    calm = Run(c.out("hijack-calm"), c.tasks, extra=["shards.transport=tcp"])  # the same run, unattacked
    if calm.wait() != 0:
        raise SystemExit("the unattacked tcp run failed:\n" + "\n".join(calm.lines[-20:]))
    out = c.out("hijack")
    run = Run(out, c.tasks, extra=["shards.transport=tcp"])
    while run.phase_at(time.time())[0] in ("launch",) and run.p.poll() is None:
        time.sleep(0.01)
    ports = sorted({int(m.group(1)) for line in run.lines for m in [re.search(r"ready on tcp://127\.0\.0\.1:(\d+)",
                                                                             line)] if m})
    exposed = [pid for pid in run.shard_pids() + [run.p.pid] if _secret_visible(pid)]
    tries = answered = 0
    while run.p.poll() is None:
        for port in ports:
            for password in (None, os.urandom(32).hex().encode()):
                s = dealer(f"tcp://127.0.0.1:{port}", password)
                for op in ("stats", "shutdown", "update", "ping"):
                    try:
                        s.send(header(op, "guess", seq=rng.randrange(1, 70), meta={"lr": 1e3} if op == "update"
                                      else {}), flags=1)
                    except Exception:  # noqa: BLE001 - zmq.Again: never admitted to connect
                        pass
                    tries += 1
                    answered += reply(s, 0.05) is not None
                s.close(linger=0)
    rc = run.wait()
    diff = same(final_state(out), ref) if rc == 0 else ["(no result)"]
    c.record("hijack", {"exit": rc, "identical": not diff, "attempts": tries, "answered": answered,
                        "failures": [f for _, f in run.failures()], "ports": ports,
                        "seconds": round(run.ended - run.started, 1), "unattacked_seconds": round(calm.ended - calm.started, 1),
                        "processes_showing_a_secret_in_argv_or_environ": exposed})


def _secret_visible(pid: int) -> bool:
    """Whether anything like a 32-byte hex secret is in the process's command line or environment
    (what `ps e` and /proc show to other processes of the user)."""
    for name in ("cmdline", "environ"):
        try:
            text = (Path("/proc") / str(pid) / name).read_bytes().decode(errors="replace")
        except OSError:
            continue
        if re.search(r"[0-9a-f]{64}", text):
            return True
    return False


# ----------------------------------------------------------------------------- summary


def summary(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    for kind, title in (("kill", "shard kill -9 at uniform times"), ("phase", "shard kill -9 aimed at a phase")):
        kills = [r for r in rows if r["kind"] == kind]
        if not kills:
            continue
        phases: dict[str, int] = {}
        for r in kills:
            for k in r["kills"]:
                phases[k["phase"]] = phases.get(k["phase"], 0) + 1
        ok = sum(r["exit"] == 0 and r["identical"] for r in kills)
        real = sum(k["phase"] != "after the run" for r in kills for k in r["kills"])
        missed = phases.get("after the run", 0) + sum(not r["kills"] for r in kills)
        print(f"{title}: {len(kills)} runs, {real} kills of a live shard ({missed} drawn after the run ended), "
              f"{ok}/{len(kills)} completed bit-identical; kills per phase {phases}; "
              f"recovered failures {sum(len(r['failures']) for r in kills)}; load {_loads(kills)}")
    coord = [r for r in rows if r["kind"] == "coordinator"]
    if coord:
        ok = sum(r["exit"] == 0 and r["identical"] for r in coord)
        print(f"coordinator kill -9 + resume: {ok}/{len(coord)} bit-identical; orphans "
              f"{sum(len(r['orphans']) for r in coord)}; stale tmp folders after the kill "
              f"{sum(r['stale_tmp_after_kill'] for r in coord)}, after the resume "
              f"{sum(r['stale_tmp_after_resume'] for r in coord)}; launch folders left "
              f"{sum(len(r['launch_folders_left']) for r in coord)}")
    stops = [r for r in rows if r["kind"] == "sigstop" and r["detected_after_s"] is not None]
    if stops:
        t = [r["detected_after_s"] for r in stops]
        print(f"SIGSTOP: {len(stops)} runs, detected after median {statistics.median(t):.2f} s, max {max(t):.2f} s; "
              f"{sum(r['identical'] for r in stops)} bit-identical")
    for r in rows:
        if r["kind"] in ("giveup", "fuzz", "flood", "hijack"):
            print(r["kind"], {k: v for k, v in r.items() if k not in ("kind", "time")})


def _loads(rows: list[dict]) -> str:
    loads = [r["load"] for r in rows]
    return f"{min(loads):.1f}-{max(loads):.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["kills", "phases", "coordinator", "sigstop", "giveup", "fuzz", "flood", "hijack", "quick",
                                      "summary"])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "chaos-results.jsonl"))
    args = p.parse_args()
    if args.what == "summary":
        summary(Path(args.out))
        return
    rng = random.Random(args.seed)
    c = Campaign(args)
    try:
        if args.what in ("kills", "quick"):
            kill_shards(c, args.runs if args.what == "kills" else 4, rng)
        if args.what in ("phases", "quick"):
            kill_in_phases(c, args.runs if args.what == "phases" else len(TARGETS), rng)
        if args.what in ("coordinator", "quick"):
            kill_coordinator(c, args.runs if args.what == "coordinator" else 2, rng)
        if args.what in ("sigstop", "quick"):
            sigstop(c, args.runs if args.what == "sigstop" else 1, rng)
        if args.what in ("giveup", "quick"):
            give_up(c, args.runs if args.what == "giveup" else 1, rng)
        if args.what in ("fuzz", "quick"):
            fuzz(c, args.frames if args.what == "fuzz" else 20_000, rng)
        if args.what in ("flood", "quick"):
            flood(c, rng)
        if args.what in ("hijack", "quick"):
            hijack(c, rng)
    finally:
        shutil.rmtree(c.work, ignore_errors=True)
    summary(Path(args.out))


if __name__ == "__main__":
    main()
