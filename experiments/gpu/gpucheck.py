"""The GPU check of issue 23 in one command: ``experiments/gpu/run.sh`` installs what is missing
and runs ``gpucheck.py run OUT``, which runs every part under one time budget and writes its
results into ``OUT`` after each part (docs/benchmarks.md, "GPU (to run)").

Parts, in the order they run (the data are generated in the background meanwhile):

==========  =========================================================================================
prepare     (background) ``tmerge data``: synthetic HCP-like and BraTS-like subjects at 1 mm in
            BraTS's 240 × 240 × 155 grid, then the preprocessing cache of the two stages below
bench       ``tmerge bench`` at its GPU defaults (128³, batch 2): every section, default network
task1       ``tmerge task1 --profile paper`` for a few hundred steps, its Fisher, step statistics
task2       ``tmerge noise-source from=task1 name=task2``: a second source for the merge, in seconds
timm        ``tmerge timm --profile paper``: the adaption and the fine-tune, step statistics
dynunet     ``tmerge bench net.name=dynunet``: the training step, eager float32 vs the fast path
segresnet   the same for ``net.name=segresnet``
==========  =========================================================================================

Each part runs as its own process group under a time limit: the smaller of its cap and the time
left before the budget's deadline; at the limit it gets SIGTERM (a training stage then saves a
checkpoint and its step statistics), 20 s later SIGKILL. A part whose prerequisite failed, or
for which too little time is left, is skipped and says so. ``--tiny`` shrinks every size for a
CPU dry run.

Files in ``OUT`` (the device tool returns at most 8, each at most 2 folders down):
``log.txt`` (run.sh's console log), ``summary.md`` (every table), ``check.json`` (every number:
environment, parts, stage statistics, goals) and ``bench-<net>.json`` per network benched.

Subcommands: ``run OUT`` (the check), ``prepare`` (the prepare part), ``env`` (the environment as
JSON), ``collect OUT`` (rewrite the output files from the work folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The output files (besides run.sh's ``log.txt``).
SUMMARY_FILE = "summary.md"
CHECK_FILE = "check.json"
BENCH_FILE = "bench-{net}.json"
#: The networks benched: the project's default and MONAI's two of ``net.name``.
NETS = ("isensee2017", "dynunet", "segresnet")
#: Seconds between SIGTERM and SIGKILL of a part at its limit.
GRACE_S = 20.0
#: Seconds kept back at the end of the budget for the last collection of results.
RESERVE_S = 10.0
#: Issue 23's goals (earlier measurements of this network on an H100, 128³, batch 2).
STEP_GOAL_S = 0.040
OVERHEAD_GOAL = 1.05
DATA_GOAL = 0.9
ADAPTION_GOAL = 1.1
#: The default sizes of the paper-scale part: BraTS's 1 mm grid, from the 192³ 1 mm anatomy.
GRID = (240, 240, 155)
#: Every part, in the order they run.
PARTS = ("prepare", "bench", "task1", "task2", "timm", "dynunet", "segresnet")
#: The longest each part may run, on a GPU (a guess: no compile time on a Hopper host has been
#: measured yet) and in the CPU dry run.
CAPS_S = {
    "prepare": 300,
    "bench": 210,
    "task1": 150,
    "task2": 30,
    "timm": 120,
    "dynunet": 60,
    "segresnet": 60,
}
TINY_CAPS_S = {
    "prepare": 300,
    "bench": 300,
    "task1": 400,
    "task2": 60,
    "timm": 400,
    "dynunet": 120,
    "segresnet": 120,
}


@dataclass(frozen=True)
class Part:
    """One command of the check.

    Attributes:
        name: One of :data:`PARTS`.
        argv: The command line after the Python interpreter.
        cap_s: The longest it may run.
        after: Parts that must have ended well first (waited for, if in the background).
        background: Started at once, beside the parts that follow, at a lower priority.
    """

    name: str
    argv: list[str]
    cap_s: float
    after: tuple[str, ...] = ()
    background: bool = False

    @property
    def least_s(self) -> float:
        """Below this much time left the part is not started: it could not finish."""
        return min(30.0, self.cap_s / 2)


@dataclass
class Outcome:
    """How a part ended."""

    name: str
    status: str  # "ok", "failed (exit N)", "timed out", "skipped: …", "running"
    seconds: float = 0.0
    limit_s: float = 0.0
    command: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ------------------------------------------------------------------------------------ the plan


def tmerge(*args: str) -> list[str]:
    """A ``tmerge`` command line for the interpreter running this script."""
    return ["-m", "tmerge.cli", *args]


def plan(work: Path, tiny: bool, names: Sequence[str] = PARTS) -> list[Part]:
    """The parts named in ``names`` (in :data:`PARTS`' order), at the paper's sizes or tiny.

    Raises:
        ValueError: a name that is not a part.
    """
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; expected some of {', '.join(PARTS)}")
    data = work / "data" / "default"  # the stages find their runs through TMERGE_RUNS (run.sh)
    # Tiny: 6 mm voxels, 16³ patches, a network of 4…16 filters, one loader worker.
    small = ["data.patch_size=16", "net.base_filters=4", "net.depth=3", "data.num_workers=1"] if tiny else []
    task1 = [
        "task1", "--profile", "paper", f"data.root={data / 'hcp'}", "trainer.step_stats=true",
        # 18 training subjects × 4 patches / batch 2 = 36 steps an epoch
        f"trainer.max_epochs={2 if tiny else 6}", *small,
    ]  # fmt: skip
    timm = [
        "timm", "--profile", "paper", f"data.root={data / 'brats'}", "trainer.step_stats=true",
        # 10 cases: 2 test (and validation, portion 100), 8 train × 8 patches / batch 2 = 32 steps
        # an epoch. No N4: SimpleITK is not on the lent GPU image.
        "data.n4=false", "data.test_size=2", "data.pool_size=null", "portion=100",
        "data.samples_per_volume=8", f"adaption.max_epochs={1 if tiny else 3}",
        f"trainer.max_epochs={1 if tiny else 3}", *small,
    ]  # fmt: skip
    grid = [max(8, round(n * 32 / 192)) for n in GRID] if tiny else list(GRID)
    data_args = [
        f"data_dir={work / 'data'}", f"size={32 if tiny else 192}", f"grid=[{','.join(map(str, grid))}]",
        "kinds=[hcp,brats]", "n_hcp=58", "n_brats=10", "n_brats_val=0", *(["workers=2"] if tiny else []),
    ]  # fmt: skip
    script = str(Path(__file__).resolve())
    prepare = [
        script,
        "prepare",
        "--data",
        json.dumps(data_args),
        "--stage",
        json.dumps(task1),
        "--stage",
        json.dumps(timm),
    ]
    bench_tiny = [
        "patch_size=16",
        "net.base_filters=4",
        "net.depth=3",
        "iters=1",
        "fisher_samples=2",
        "num_workers=1",
    ]
    monai = ["skip=[lightning,data,fisher,adaption]", *(["patch_size=32", "iters=1"] if tiny else [])]
    caps = TINY_CAPS_S if tiny else CAPS_S

    def bench(net: str, extra: list[str]) -> list[str]:
        return tmerge("bench", f"net.name={net}", f"out_dir={work / 'bench' / net}", *extra)

    parts = {
        "prepare": Part("prepare", prepare, caps["prepare"], background=True),
        "bench": Part("bench", bench("isensee2017", bench_tiny if tiny else []), caps["bench"]),
        "task1": Part("task1", tmerge(*task1), caps["task1"], after=("prepare",)),
        "task2": Part("task2", tmerge("noise-source", "from=task1", "name=task2"), caps["task2"], ("task1",)),
        "timm": Part("timm", tmerge(*timm), caps["timm"], after=("prepare", "task1", "task2")),
        "dynunet": Part("dynunet", bench("dynunet", monai), caps["dynunet"]),
        "segresnet": Part("segresnet", bench("segresnet", monai), caps["segresnet"]),
    }
    return [parts[n] for n in PARTS if n in names]


# ------------------------------------------------------------------------------------ running


class Runner:
    """Runs the parts of a plan under one deadline, collecting the results after each."""

    def __init__(
        self, parts: list[Part], deadline: float, on_change: Callable[[dict[str, Outcome]], None]
    ) -> None:
        self.parts = parts
        self.deadline = deadline  # time.monotonic() value
        self.on_change = on_change  # called with the outcomes after every change
        self.outcomes: dict[str, Outcome] = {}
        self._background: dict[str, tuple[subprocess.Popen[bytes], float, Part]] = {}

    def left(self) -> float:
        return self.deadline - RESERVE_S - time.monotonic()

    def run(self) -> dict[str, Outcome]:
        for part in self.parts:
            blocked = self._blocked(part)
            if blocked:
                self._record(Outcome(part.name, f"skipped: {blocked}", command=_shown(part)))
            elif part.background:
                self._start_background(part)
            else:
                self._record(self._run(part))
        for name in list(self._background):  # a background part nothing waited for
            self._record(self._finish_background(name))
        return self.outcomes

    def _blocked(self, part: Part) -> str | None:
        """Why ``part`` cannot run now (a prerequisite that failed, no time), or None."""
        for name in part.after:
            if name in self._background:
                self._record(self._finish_background(name))
            outcome = self.outcomes.get(name)
            if outcome is not None and not outcome.ok:
                how = "was skipped" if outcome.status.startswith("skipped") else outcome.status
                return f"needs {name}, which {how}"
        if self.left() < part.least_s:
            return f"{self.left():.0f} s left of the budget, {part.least_s:.0f} s needed"
        return None

    def _start_background(self, part: Part) -> None:
        command = [sys.executable, *part.argv]
        if shutil.which("nice"):
            command = ["nice", "-n", "10", *command]
        print(f"[gpucheck] {part.name} (background, ≤ {part.cap_s:.0f} s): {_shown(part)}", flush=True)
        process = subprocess.Popen(command, start_new_session=True)
        self._background[part.name] = (process, time.monotonic(), part)
        self.outcomes[part.name] = Outcome(part.name, "running", limit_s=part.cap_s, command=_shown(part))

    def _finish_background(self, name: str) -> Outcome:
        process, started, part = self._background.pop(name)
        limit = max(0.0, min(started + part.cap_s - time.monotonic(), self.left()))
        status = _wait(process, limit)
        return Outcome(name, status, time.monotonic() - started, part.cap_s, _shown(part))

    def _run(self, part: Part) -> Outcome:
        limit = min(part.cap_s, self.left())
        print(f"[gpucheck] {part.name} (≤ {limit:.0f} s): {_shown(part)}", flush=True)
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, *part.argv], start_new_session=True)
        status = _wait(process, limit)
        outcome = Outcome(part.name, status, time.monotonic() - started, limit, _shown(part))
        print(f"[gpucheck] {part.name}: {status} after {outcome.seconds:.0f} s", flush=True)
        return outcome

    def _record(self, outcome: Outcome) -> None:
        self.outcomes[outcome.name] = outcome
        self.on_change(self.outcomes)


def _wait(process: subprocess.Popen[bytes], limit_s: float) -> str:
    """Wait up to ``limit_s`` for ``process``; past it, SIGTERM its process group, SIGKILL after
    :data:`GRACE_S`. Returns the part's status."""
    try:
        code = process.wait(timeout=max(limit_s, 0.0))
        return "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
        return "timed out"


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """``sig`` to the process group the part was started in (its loader workers included)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _shown(part: Part) -> str:
    """The part's command as one would type it."""
    argv = part.argv
    if argv[:2] == ["-m", "tmerge.cli"]:
        return " ".join(["tmerge", *argv[2:]])
    return " ".join(["python", Path(argv[0]).name, *argv[1:2]])


# ------------------------------------------------------------------------------------ prepare


def prepare(data_args: list[str], stages: list[list[str]]) -> None:
    """Generate the data (``tmerge data`` with ``data_args``), then fill the preprocessing cache
    of each stage command in ``stages`` (a ``tmerge`` command line each) as that stage would."""
    from tmerge.cli import build_parser, command_config, configure_logging, main

    configure_logging()
    started = time.perf_counter()
    if main(["data", *data_args]) != 0:
        raise SystemExit("prepare: tmerge data failed")
    print(f"[gpucheck] data generated in {time.perf_counter() - started:.0f} s", flush=True)
    for argv in stages:
        started = time.perf_counter()
        data_module(command_config(build_parser().parse_args(argv))).prepare_data()
        print(f"[gpucheck] {argv[0]}: data preprocessed in {time.perf_counter() - started:.0f} s", flush=True)


def data_module(cfg: Any) -> Any:
    """The DataModule a source stage's (``SourceStageConfig``) or a target stage's config trains on."""
    from tmerge.data.hcp import HCPDataModule
    from tmerge.data.target import TargetDataModule
    from tmerge.stages.source import SourceStageConfig
    from tmerge.stages.target import run_config

    if isinstance(cfg, SourceStageConfig):
        return HCPDataModule(**dataclasses.asdict(cfg.data))
    return TargetDataModule(**dataclasses.asdict(run_config(cfg).data))


# ------------------------------------------------------------------------------------ environment


def environment() -> dict[str, Any]:
    """Where the check ran: machine, accelerator, versions, date."""
    import lightning
    import torch

    env: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
        env["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    return env


# ------------------------------------------------------------------------------------ results


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None where it is missing or cut off mid-write."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The string metadata in a safetensors file's header (no tensor is read)."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    return header.get("__metadata__")


def stage_stats(runs: Path) -> dict[str, dict[str, Any]]:
    """Per fit folder under ``runs`` with a ``step_stats.json``: those statistics, the fit's
    record (epochs, wall time) and, for a source, its Fisher's metadata. Keyed by the folder
    relative to ``runs`` (``task1``, ``brats/p100/timm/adaption``, …)."""
    from tmerge.runs import FISHER_FILE, FIT_FILE, STEP_STATS_FILE

    out: dict[str, dict[str, Any]] = {}
    for path in sorted(runs.rglob(STEP_STATS_FILE)) if runs.is_dir() else []:
        folder = path.parent
        entry: dict[str, Any] = {"steps": read_json(path), "fit": read_json(folder / FIT_FILE)}
        fisher = safetensors_metadata(folder / FISHER_FILE)
        if fisher is not None:
            entry["fisher"] = fisher
        out[folder.relative_to(runs).as_posix()] = entry
    return out


def goals(bench: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Issue 23's goals against the default network's bench results (those measured)."""
    if not bench:
        return []
    rows: list[dict[str, Any]] = []

    def add(what: str, value: float, goal: str, met: bool) -> None:
        rows.append({"goal": what, "measured": value, "target": goal, "met": met})

    step = bench.get("step", {}).get("fast", {}).get("s")
    if step is not None:
        add("training step, default fast path (s)", step, f"≤ {STEP_GOAL_S}", step <= STEP_GOAL_S)
    if "lightning" in bench:
        overhead = bench["lightning"]["lightning"]["s"] / bench["lightning"]["bare"]["s"]
        add(
            "Lightning loop overhead (× the bare step)",
            overhead,
            f"≤ {OVERHEAD_GOAL}",
            overhead <= OVERHEAD_GOAL,
        )
    if "data" in bench:
        ratio = bench["data"]["device"]["s"] / bench["data"]["real"]["s"]
        add("data pipeline (× the speed on device tensors)", ratio, f"≥ {DATA_GOAL}", ratio >= DATA_GOAL)
    if "fisher" in bench:
        methods = bench["fisher"]["methods"]
        best = min(methods, key=lambda m: methods[m]["s"])
        plain = bench.get("step", {}).get("fast", {}).get("s") or bench.get("adaption", {}).get(
            "plain", {}
        ).get("s")
        seconds = methods[best]["s"]
        if plain:
            add(
                f"Fisher per volume, fastest ({best}) (× a training step)",
                seconds / plain,
                "≤ 1",
                seconds <= plain,
            )
        rows.append(
            {
                "goal": "Fisher methods equal",
                "measured": bench["fisher"]["equal"],
                "target": "true",
                "met": bool(bench["fisher"]["equal"]),
            }
        )
    if "adaption" in bench:
        ratio = bench["adaption"]["adaption"]["s"] / bench["adaption"]["plain"]["s"]
        add("adaption step (× a plain step)", ratio, f"≤ {ADAPTION_GOAL}", ratio <= ADAPTION_GOAL)
    return rows


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mib(value: Any) -> str:
    return "—" if value is None else f"{value:,.0f}"


def summary(check: dict[str, Any], benches: dict[str, dict[str, Any]]) -> str:
    """``summary.md``: environment, parts, goals, networks side by side, the bench tables and
    the paper-scale stages."""
    from tmerge.bench import format_table

    env = check.get("environment") or {}
    lines = [
        f"# tmerge GPU check — {env.get('device', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('cuda')}), "
        f"lightning {env.get('lightning', '?')}, {env.get('when', '?')}",
        "",
        f"Command: `{check.get('command', '')}`; {'tiny sizes (CPU dry run)' if check.get('tiny') else 'paper sizes'}; "
        f"nvidia-smi: {env.get('nvidia_smi', '—')}; {env.get('cpus', '?')} CPUs.",
        "",
        "## Parts",
        "",
        "| part | status | seconds | limit s | command |",
        "|---|---|---|---|---|",
    ]
    for o in check.get("parts", []):
        lines.append(
            f"| {o['name']} | {o['status']} | {o['seconds']:.0f} | {o['limit_s']:.0f} | `{o['command']}` |"
        )
    if check.get("goals"):
        lines += [
            "",
            "## Goals (issue 23; default network, bench)",
            "",
            "| goal | measured | target | met |",
            "|---|---|---|---|",
        ]
        for g in check["goals"]:
            lines.append(f"| {g['goal']} | {_number(g['measured'])} | {g['target']} | {_number(g['met'])} |")
    if benches:
        lines += [
            "",
            "## Networks side by side (training step)",
            "",
            "| network | parameters | eager float32 | fast path | speed-up | first fast step (compile) | peak MiB fast |",
            "|---|---|---|---|---|---|---|",
        ]
        for net, results in benches.items():
            step = results.get("step")
            s = results.get("settings", {})
            if step is None:
                lines.append(f"| {s.get('net_label', net)} | — | not measured | | | | |")
                continue
            ref, fast = step["reference"], step["fast"]
            params = s.get("net_parameters")
            lines.append(
                f"| {s.get('net_label', net)} | {'—' if params is None else f'{params / 1e6:.2f} M'} | {ref['s']:.4f} s | "
                f"{fast['s']:.4f} s ({fast['label']}) | {ref['s'] / fast['s']:.2f}× | {fast.get('first_s', 0):.1f} s | "
                f"{_mib(fast.get('peak_mib'))} |"
            )
        for net, results in benches.items():
            lines += [
                "",
                f"## Bench: {net}",
                "",
                format_table(results).replace("# tmerge bench", "### tmerge bench", 1),
            ]
    stages = check.get("stages") or {}
    if stages:
        lines += [
            "",
            "## Paper-scale stages (synthetic 1 mm data, BraTS grid; step_stats.json)",
            "",
            "| stage | timed steps | s/step mean | s/step median | device busy s | wait share | host between steps s "
            "| peak MiB (allocated / reserved or RSS) | warm-up steps s | epochs | fit s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, entry in stages.items():
            st = entry.get("steps") or {}
            fit = entry.get("fit") or {}
            peak = (
                f"{_mib(st.get('peak_allocated_mib'))} / {_mib(st.get('peak_reserved_mib'))}"
                if "peak_allocated_mib" in st
                else f"{_mib(st.get('peak_rss_mib'))} RSS"
            )
            warm = ", ".join(f"{v:.2f}" for v in st.get("warmup_s", [])) or "—"
            lines.append(
                f"| {label} | {st.get('steps', 0)} | {_number(st.get('s_per_step'), 4)} | {_number(st.get('median_s_per_step'), 4)} "
                f"| {_number(st.get('busy_s'), 4)} | {_number(st.get('wait_share'), 2)} | {_number(st.get('host_between_s'), 4)} "
                f"| {peak} | {warm} | {st.get('epochs', '—')} | {_number(fit.get('wall_s'), 0)} |"
            )
        for label, entry in stages.items():
            fisher = entry.get("fisher")
            if fisher and fisher.get("seconds"):
                samples = int(fisher.get("samples", 0)) or 1
                seconds = float(fisher["seconds"])
                lines.append(
                    f"\n- {label} Fisher: {samples} volumes by {fisher.get('method')} ({fisher.get('precision')}) "
                    f"in {seconds:.1f} s, {seconds / samples:.3f} s per volume"
                )
    return "\n".join(lines) + "\n"


def collect(work: Path, out: Path, check: dict[str, Any]) -> None:
    """Write the output files from the work folder: ``bench-<net>.json`` per bench run,
    ``check.json`` (``check`` with the stage statistics and goals added) and ``summary.md``.
    Safe to call at any time: a part cut off leaves what it had written."""
    benches: dict[str, dict[str, Any]] = {}
    for net in NETS:
        results = read_json(work / "bench" / net / "results.json")
        if results is not None:
            benches[net] = results
            (out / BENCH_FILE.format(net=net)).write_text(json.dumps(results, indent=2) + "\n")
    check = {**check, "stages": stage_stats(work / "runs"), "goals": goals(benches.get("isensee2017"))}
    (out / CHECK_FILE).write_text(json.dumps(check, indent=2) + "\n")
    (out / SUMMARY_FILE).write_text(summary(check, benches))


# ------------------------------------------------------------------------------------ main


def run(out: Path, work: Path, tiny: bool, budget_s: float, names: Sequence[str]) -> int:
    """The whole check; returns 0 when every part ended well."""
    started = float(os.environ.get("GPU_CHECK_START", time.time()))
    deadline = time.monotonic() + budget_s - (time.time() - started)
    out.mkdir(parents=True, exist_ok=True)
    parts = plan(work, tiny, names)
    env_json = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "env"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    check: dict[str, Any] = {
        "command": os.environ.get("GPU_CHECK_COMMAND") or " ".join(["gpucheck.py", *sys.argv[1:]]),
        "tiny": tiny,
        "budget_s": budget_s,
        "environment": json.loads(env_json.stdout)
        if env_json.returncode == 0
        else {"error": env_json.stderr[-2000:]},
        "parts": [],
    }
    print(f"[gpucheck] {check['environment']}", flush=True)

    def on_change(outcomes: dict[str, Outcome]) -> None:
        check["parts"] = [dataclasses.asdict(o) for o in outcomes.values()]
        collect(work, out, check)

    outcomes = Runner(parts, deadline, on_change).run()
    on_change(outcomes)
    print((out / SUMMARY_FILE).read_text(), flush=True)
    total = time.time() - started
    print(f"[gpucheck] done in {total:.0f} s (budget {budget_s:.0f} s); results in {out}", flush=True)
    return 0 if all(o.ok for o in outcomes.values()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpucheck.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("run", help="the whole check")
    p.add_argument("out", type=Path, help="output folder (the device tool's $OUT)")
    p.add_argument(
        "--work", type=Path, default=Path(os.environ.get("GPU_CHECK_WORK", "/tmp/tmerge-gpu-check"))
    )
    p.add_argument("--tiny", action="store_true", help="every size shrunk: a CPU dry run")
    p.add_argument(
        "--budget", type=float, default=None, help="seconds for everything (default 540, tiny 2400)"
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    p = sub.add_parser("prepare", help="generate the data and fill the stages' preprocessing cache")
    p.add_argument("--data", required=True, help="tmerge data overrides, as a JSON list")
    p.add_argument(
        "--stage", action="append", default=[], help="a stage's tmerge command line, as a JSON list"
    )
    sub.add_parser("env", help="the environment as JSON")
    p = sub.add_parser("collect", help="rewrite the output files from the work folder")
    p.add_argument("out", type=Path)
    p.add_argument(
        "--work", type=Path, default=Path(os.environ.get("GPU_CHECK_WORK", "/tmp/tmerge-gpu-check"))
    )
    args = parser.parse_args(argv)
    if args.what == "run":
        budget = args.budget if args.budget is not None else (2400.0 if args.tiny else 540.0)
        names = [n.strip() for n in args.parts.split(",") if n.strip()]
        return run(args.out, args.work, args.tiny, budget, names)
    if args.what == "prepare":
        prepare(json.loads(args.data), [json.loads(s) for s in args.stage])
        return 0
    if args.what == "env":
        print(json.dumps(environment()))
        return 0
    previous = read_json(args.out / CHECK_FILE) or {}
    collect(args.work, args.out, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
