"""Scaling with generators: real TCP generators on this machine, and a simulation of many.

    python bench/scaling.py [--real] [--sim] [--generators 1 2 4] [--steps 60]
                            [--sim-generators 64] [--sim-steps 300] [--json bench/results/scaling.json]

Real: one `flux train` per N in --generators with `net.remote` on and no local generator, and N
`flux generator --connect tcp://127.0.0.1:PORT` processes attached over TCP loopback (CURVE). Throughput is
measured once all N have registered (the steps before that are left out). Twice: generation on the CPU
as is (`compute`: on a 2-core machine N generators share two cores with the learner), and with a
simulated slower generator (`paced`: `rollout.slowdown` seconds of sleep per token, a stand-in for
generators whose work is elsewhere, e.g. a GPU each), which shows what the machinery itself does with N.

Simulation (SIMULATED, not measured): a discrete-event simulation of the controller with many
generators and long-tailed completion lengths. It drives the real control code with a simulated clock:
`flux.control.admission.Admission` and `PromptCursor` hand out the credits, `flux.control.composer.Composer` composes
the batches (whole groups, freshest first; a group with no token within eta_max dropped and its credit
given back, older tokens of the others masked out of the loss as the learner does),
`flux.control.pid.PID` sets the async ratio from `flux.control.staleness.combined_staleness`, whose divergence term is
modelled (D grows with the batch's mean lag: `--sim-div-per-lag`). It reports simulated learner
utilisation, staleness, lag and drops per mode.
"""

from __future__ import annotations

import argparse
import heapq
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import machine

from flux.control.admission import Admission, PromptCursor
from flux.control.composer import Composer
from flux.config import AdaptiveAsyncConfig, StalenessConfig
from flux.control.pid import PID
from flux.control.staleness import combined_staleness, lag_stats


# ---------------------------------------------------------------- simulation
@dataclass
class SimGroup:
    """What the Composer reads of a TrajectoryGroup."""

    group_id: int
    sample_count: int
    versions: np.ndarray
    rewards: np.ndarray
    tokens: int
    response_lens: np.ndarray  # (the Composer counts the lengths of what it drops)


@dataclass
class SimConfig:
    generators: int = 64
    mode: str = "adaptive"
    steps: int = 300
    seed: int = 0
    group_size: int = 16
    groups_per_step: int = 32
    eta_max: int = 2
    target: float = 0.1
    token_s: float = 0.01          # seconds per decode step of one generator's batch
    len_median: float = 300.0      # completion length: lognormal(median, sigma), capped
    len_sigma: float = 1.0
    max_len: int = 2048
    train_s: float = 2.0           # learner step: train_s + train_token_s x tokens in the batch
    train_token_s: float = 4e-5
    sync_s: float = 0.5            # from publish to a generator's engine holding the version
    div_per_lag: float = 0.05      # modelled divergence D = div_per_lag x mean lag
    num_prompts: int = 10000


@dataclass(order=True)
class Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    data: object = field(compare=False, default=None)


class Simulation:
    """The controller's admission/PID, the buffer's composer and the staleness measure, on a simulated clock."""

    def __init__(self, c: SimConfig):
        self.c = c
        aa, st = AdaptiveAsyncConfig(), StalenessConfig()
        ratio = {"sync": 0.0, "async": aa.max_async_ratio, "adaptive": aa.initial_async_ratio}[c.mode]
        self.batch = c.group_size * c.groups_per_step
        self.admission = Admission(self.batch, c.eta_max, ratio)
        self.pid = PID(c.target, aa.kp, aa.ki, aa.kd, aa.min_async_ratio, aa.max_async_ratio,
                       bias=aa.initial_async_ratio, ema_horizon=aa.ema_horizon)
        self.cursor = PromptCursor(c.num_prompts, c.seed)
        self.composer = Composer(eta_max=c.eta_max)
        self.d_ref, self.w_lag = st.d_ref, st.w_lag
        self.rng = np.random.default_rng(c.seed)
        self.events: list[Event] = []
        self.seq = 0
        self.now = 0.0
        self.published = [0.0]          # publish time of each version
        self.waiting_gens: list[int] = []
        self.learner_busy = False
        self.learner_busy_s = 0.0
        self.gen_busy_s = 0.0
        self.step = 0
        self.next_gid = 0
        self.rows: list[dict] = []
        self.dropped = 0
        self.masked_tokens = 0  # tokens older than eta_max, masked out of the loss (their group trained)

    def at(self, t: float, kind: str, data=None) -> None:
        self.seq += 1
        heapq.heappush(self.events, Event(t, self.seq, kind, data))

    def run(self) -> dict:
        for g in range(self.c.generators):
            self.at(0.0, "gen_ready", g)
        self.at(0.0, "learner_ready")
        while self.events and self.step < self.c.steps:
            ev = heapq.heappop(self.events)
            self.now = ev.time
            getattr(self, ev.kind)(ev.data)
        return self.summary()

    # ---- generators ------------------------------------------------------------------------------
    def gen_ready(self, g: int) -> None:
        n = self.c.group_size
        if not self.admission.try_admit(n):
            self.waiting_gens.append(g)  # no credit: ask again when a version is published
            return
        gid, _ = self.next_gid, self.cursor.next()
        self.next_gid += 1
        # Admit.version: the group runs on weights at least that new (sync mode waits for them here).
        start = max(self.now, self.published[self.admission.version] + self.c.sync_s)
        lens = np.minimum(self.c.max_len, np.maximum(1, self.rng.lognormal(np.log(self.c.len_median),
                                                                           self.c.len_sigma, n))).astype(int)
        done = start + lens.max() * self.c.token_s
        self.gen_busy_s += done - start
        self.at(done, "group_done", (g, gid, start, lens))

    def group_done(self, data) -> None:
        g, gid, start, lens = data
        # One batched decode: token k of every sample was sampled at start + k * token_s with the weights
        # the engine held then (in-flight updates: a sample may span versions). Every version published
        # before now is known now, so the per-token versions are settled here.
        token_times = start + np.arange(lens.max()) * self.c.token_s
        held = np.searchsorted(np.asarray(self.published), token_times - self.c.sync_s, side="right") - 1
        versions = np.concatenate([np.maximum(held[:k], 0) for k in lens]).astype(np.int32)
        n = len(lens)
        self.composer.add(SimGroup(gid, n, versions, self.rng.random(n).astype(np.float32), int(lens.sum()),
                                   np.asarray(lens, np.int32)))
        self.at(self.now, "gen_ready", g)
        if not self.learner_busy:
            self.learner_ready(None)

    # ---- learner ---------------------------------------------------------------------------------
    def learner_ready(self, _) -> None:
        if self.learner_busy:
            return
        version = self.admission.version
        groups = self.composer.take(self.c.groups_per_step, version)
        for _gid in (g for ids in self.composer.pop_dropped().values() for g in ids):  # too stale: credit back
            self.admission.give_back(self.c.group_size)
            self.dropped += 1
        if groups is None:
            return  # woken by the next group_done
        versions = np.concatenate([g.versions for g in groups])
        kept = versions[version - versions <= self.c.eta_max]  # as the learner: older tokens leave the loss
        self.masked_tokens += len(versions) - len(kept)
        lag = lag_stats(kept, version)
        div = self.c.div_per_lag * lag["mean"]
        s = combined_staleness(lag["mean"], div, eta_max=max(1, self.c.eta_max), d_ref=self.d_ref, w_lag=self.w_lag)
        tokens = int(sum(g.tokens for g in groups))
        train = self.c.train_s + self.c.train_token_s * tokens
        self.learner_busy = True
        self.learner_busy_s += train
        self.rows.append({"step": self.step, "time": self.now, "staleness": s, "lag_mean": lag["mean"],
                          "lag_max": lag["max"], "async_ratio": self.admission.async_ratio, "tokens": tokens})
        self.at(self.now + train, "step_done", s)

    def step_done(self, s: float) -> None:
        self.learner_busy = False
        self.step += 1
        self.published.append(self.now)
        self.admission.version += 1
        if self.c.mode == "adaptive":
            self.admission.async_ratio = self.pid.update(s)
        waiting, self.waiting_gens = self.waiting_gens, []
        for g in waiting:
            self.at(self.now, "gen_ready", g)
        self.learner_ready(None)

    def summary(self) -> dict:
        t = self.now
        rows = self.rows[len(self.rows) // 10:]  # the first tenth is the start-up transient
        return {"simulated": True, "generators": self.c.generators, "mode": self.c.mode, "steps": self.step,
                "sim_seconds": t, "learner_utilisation": self.learner_busy_s / t,
                "generator_utilisation": self.gen_busy_s / (t * self.c.generators),
                "samples_per_s": self.step * self.batch / t,
                "staleness_mean": float(np.mean([r["staleness"] for r in rows])),
                "lag_mean": float(np.mean([r["lag_mean"] for r in rows])),
                "lag_max": float(max(r["lag_max"] for r in rows)),
                "async_ratio_final": self.admission.async_ratio, "dropped_groups": self.dropped,
                "masked_stale_tokens": self.masked_tokens}


def simulate(generators: list[int], steps: int, seed: int, div_per_lag: float, targets: list[float]) -> list[dict]:
    out = []
    for g in generators:
        for mode, target in [("sync", None), ("async", None), *(("adaptive", t) for t in targets)]:
            t0 = time.monotonic()
            c = SimConfig(generators=g, mode=mode, steps=steps, seed=seed, div_per_lag=div_per_lag)
            if target is not None:
                c.target = target
            res = Simulation(c).run()
            res["target"] = target
            res["wall_s"] = time.monotonic() - t0
            out.append(res)
            print(f"SIMULATED {g} generators, {mode}: learner {res['learner_utilisation']:.2f}, "
                  f"staleness {res['staleness_mean']:.3f}", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------- real generators over TCP
def registered_at(controller_log: Path) -> dict[str, float]:
    """Wall-clock time each remote generator registered, from the controller's log."""
    found = {}
    for line in controller_log.read_text().splitlines():
        m = re.match(r"(\S+ \S+) I flux\.controller: generator (\S+) registered .*remote", line)
        if m:
            found[m.group(2)] = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return found


def real_run(n: int, steps: int, keys: Path, out: Path, paced: float) -> dict:
    """One `flux train` with n remote generators attached over TCP loopback; throughput once all are in."""
    run_dir = out / f"{'paced' if paced else 'compute'}-{n}"
    sets = ["net.remote=true", f"net.keys={keys}", "rollout.num_generators=0", "eval.num_prompts=20",
            "learner.groups_per_step=8", "rollout.group_size=8", "rollout.groups_per_call=2",
            f"rollout.slowdown={paced}"]
    cmd = [sys.executable, "-m", "flux.cli", "train", "--max-steps", str(steps), "--out", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"real: {n} generators ({'paced' if paced else 'compute'}) in {run_dir}", file=sys.stderr, flush=True)
    with open(run_dir.parent / f"{run_dir.name}.out", "w") as log:  # the child keeps its own descriptor
        train = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    gens = []
    try:
        ctl_log = run_dir / "logs" / "controller.log"
        deadline = time.monotonic() + 120
        while not (ctl_log.exists() and "remote endpoints up" in ctl_log.read_text()):
            if time.monotonic() > deadline or train.poll() is not None:
                raise RuntimeError(f"the run did not come up: {run_dir}")
            time.sleep(0.5)
        connect = json.loads((run_dir / "spec.json").read_text())["remote"]["connect"]
        for i in range(n):
            gens.append(subprocess.Popen(
                [sys.executable, "-m", "flux.cli", "generator", "--connect", connect, "--key",
                 str(keys / "bench.key_secret"), "--name", f"tcp{i}", "--out", str(run_dir / f"gen{i}")],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        code = train.wait(timeout=1800)
        for g in gens:
            g.wait(timeout=60)
    finally:
        for p in (train, *gens):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    groups = json.loads((run_dir / "groups.json").read_text())
    joined = registered_at(run_dir / "logs" / "controller.log")
    status = json.loads((run_dir / "status.json").read_text())
    t_all = max(joined.values()) if len(joined) == n else None
    # wall_s of each row is since the controller started; status "started" is that start, in wall time
    after = [r for r in rows if t_all is not None and status["started"] + r["wall_s"] >= t_all]
    res = {"generators": n, "paced_s_per_token": paced, "exit_code": code, "steps": len(rows),
           "steps_with_all_attached": len(after), "groups_by_generator": groups.get("by_generator", {})}
    if len(after) >= 3:
        span = after[-1]["wall_s"] - after[0]["wall_s"]
        samples = sum(r["samples"] for r in after[1:])
        res["samples_per_s"] = samples / span
        res["per_generator_samples_per_s"] = res["samples_per_s"] / n
        res["learner_busy"] = float(np.mean([r["learner_busy_frac"] for r in after]))
        res["generator_busy"] = float(np.mean([r["generator_busy_frac"] for r in after]))
        res["staleness_mean"] = float(np.mean([r["staleness_mean"] for r in after]))
    print(f"real: {n} generators: {res.get('samples_per_s', float('nan')):.0f} samples/s "
          f"({len(after)} steps with all attached)", file=sys.stderr, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", action="store_true", help="only the real TCP runs (default: both parts)")
    ap.add_argument("--sim", action="store_true", help="only the simulation")
    ap.add_argument("--generators", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=60, help="steps per real run")
    ap.add_argument("--paced", type=float, default=0.003, help="rollout.slowdown of the paced real runs")
    ap.add_argument("--sim-generators", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--sim-steps", type=int, default=300)
    ap.add_argument("--sim-div-per-lag", type=float, default=0.05)
    ap.add_argument("--sim-targets", type=float, nargs="+", default=[0.1, 0.2],
                    help="target staleness of the adaptive runs (0.1 is the default config)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(ROOT / "bench/results/scaling.json"))
    args = ap.parse_args()
    both = not (args.real or args.sim)
    result: dict = {"machine": {**machine(), "note": "2-core shared CPU VM; other jobs were running"}}
    if args.real or both:
        from flux.integrations.remote.auth import make_keys

        work = Path(tempfile.mkdtemp(prefix="flux-scaling-"))
        make_keys(work / "keys", ["bench"])
        result["real"] = [real_run(n, args.steps, work / "keys", work, paced)
                          for paced in (0.0, args.paced) for n in args.generators]
    if args.sim or both:
        result["simulation"] = {"label": "SIMULATED: discrete-event simulation driving flux.control.admission, "
                                         "flux.control.pid, flux.control.composer, flux.control.staleness on a simulated clock",
                                "config": SimConfig().__dict__,
                                "runs": simulate(args.sim_generators, args.sim_steps, args.seed, args.sim_div_per_lag,
                                                 args.sim_targets)}
    print(tables(result))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


def tables(result: dict) -> str:
    lines = []
    if "real" in result:
        lines += ["Real generators over TCP loopback (CURVE), measured once all are attached:", "",
                  ("| generation | generators | samples/s | per generator | learner busy | generator busy | "
                   "staleness | groups by generator |"), "|---|---|---|---|---|---|---|---|"]
        for r in result["real"]:
            kind = f"paced ({r['paced_s_per_token']:g} s/token)" if r["paced_s_per_token"] else "compute"
            if "samples_per_s" not in r:
                lines.append(f"| {kind} | {r['generators']} | (too few steps with all attached) | | | | | |")
                continue
            lines.append(f"| {kind} | {r['generators']} | {r['samples_per_s']:.0f} | "
                         f"{r['per_generator_samples_per_s']:.0f} | {r['learner_busy']:.2f} | "
                         f"{r['generator_busy']:.2f} | {r['staleness_mean']:.3f} | "
                         f"{', '.join(f'{k} {v}' for k, v in sorted(r['groups_by_generator'].items()))} |")
        lines.append("")
    if "simulation" in result:
        lines += [f"{result['simulation']['label']}:", "",
                  ("| SIMULATED generators | mode | learner utilisation | generator utilisation | samples/s | "
                   "staleness | lag mean / max | dropped groups | final async ratio |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result["simulation"]["runs"]:
            mode = f"adaptive (target {r['target']:g})" if r["mode"] == "adaptive" else r["mode"]
            lines.append(f"| {r['generators']} | {mode} | {r['learner_utilisation']:.2f} | "
                         f"{r['generator_utilisation']:.2f} | {r['samples_per_s']:.0f} | {r['staleness_mean']:.3f} | "
                         f"{r['lag_mean']:.2f} / {r['lag_max']:.0f} | {r['dropped_groups']} | "
                         f"{r['async_ratio_final']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
