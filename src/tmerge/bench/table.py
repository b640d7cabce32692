"""The Markdown table of a bench run (also printed), from the results' dict.

Each row compares a reference A with a candidate B; "B vs A" (speed-up, overhead, ratio) is
computed here from the two times in the dict, so the table shows what the times say even for a
hand-written results dict.
"""

from __future__ import annotations

from typing import Any

from tmerge.bench.sections import PAPER_TASK_VOLUMES


def fmt_seconds(value: float | None) -> str:
    """``0.0123`` → ``"12.3 ms"``, ``3.671`` → ``"3.67 s"``, ``None`` → ``"—"``."""
    if value is None:
        return "—"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def fmt_mib(value: float | None) -> str:
    """``1733.4`` → ``"1,733"``, ``None`` → ``"—"``."""
    return "—" if value is None else f"{value:,.0f}"


def faster(ratio: float) -> str:
    """A speed ratio (time A / time B) in words: ``2.0`` → ``"2.00× faster"``, ``0.5`` →
    ``"2.00× slower"``."""
    return f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"


def net_label(settings: dict[str, Any]) -> str:
    """The network of a results' ``settings``: its label and parameter count where recorded
    (results written before they were), else the default network's sizes."""
    net = settings["net"]
    label = settings.get("net_label") or f"Isensee2017 base {net['base_filters']} depth {net['depth']}"
    count = settings.get("net_parameters")
    return label if count is None else f"{label} ({count / 1e6:.2f} M parameters)"


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of ``results`` (as written to the results file): a title, a line of
    settings, one row per measurement, then notes."""
    env, s = results["environment"], results["settings"]
    memory = "peak CUDA MiB" if env["device_type"] == "cuda" else "peak RSS MiB"
    lines = [
        f"# tmerge bench — {env['device']} ({env['device_type']}), torch {env['torch']}, lightning {env['lightning']}",
        "",
        f"{s['patch_size']}³ patches, batch {s['batch_size']}, {net_label(s)}, "
        f"{s['in_channels']}→{s['n_classes']} channels; fast path: "
        f"{'compiled' if s['compile'] else 'eager'} {s['precision']}; {s['warmup']} warm-up + {s['iters']} "
        f"timed steps; loss: {s['loss']}; {env['when']}, {env['cpu_threads']} CPU threads.",
        "",
        f"| measurement | A | time A | B | time B | B vs A | {memory} A / B |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(what: str, a: dict[str, Any], b: dict[str, Any], ratio: str) -> None:
        lines.append(
            f"| {what} | {a['label']} | {fmt_seconds(a['s'])} | {b['label']} | {fmt_seconds(b['s'])} | {ratio} | "
            f"{fmt_mib(a.get('peak_mib'))} / {fmt_mib(b.get('peak_mib'))} |"
        )

    notes: list[str] = []
    if "step" in results:
        st = results["step"]
        same = " (same path on this device)" if st["fast"].get("same_as_reference") else ""
        row(
            "training step",
            st["reference"],
            st["fast"],
            f"{faster(st['reference']['s'] / st['fast']['s'])}{same}",
        )
        if st["fast"].get("compile_error"):
            notes.append(f"torch.compile failed, eager fallback: {st['fast']['compile_error']}")
        if s["compile"]:
            notes.append(f"first fast step incl. compilation: {fmt_seconds(st['fast']['first_s'])}")
    if "lightning" in results:
        lt = results["lightning"]
        loop_s = lt["lightning"]["s"]
        row("Lightning loop", lt["bare"], lt["lightning"], f"overhead {loop_s / lt['bare']['s']:.2f}×")
        notes.append(f"Lightning module: {lt['module']}; {1 / loop_s:.2f} steps/s")
    if "data" in results:
        dt = results["data"]
        ratio = dt["device"]["s"] / dt["real"]["s"]
        verdict = "keeps up" if ratio >= dt["target"] else "too slow"
        row(
            "data pipeline",
            dt["device"],
            dt["real"],
            f"{ratio:.2f} of the speed (target ≥ {dt['target']}: {verdict})",
        )
        notes.append(
            f"loader alone: {fmt_seconds(dt['loader_s_per_batch'])} per batch with {dt['num_workers']} worker(s)"
        )
    if "fisher" in results:
        fi = results["fisher"]
        methods = fi["methods"]
        ref = methods[fi["reference"]]
        for name, m in methods.items():
            if name == fi["reference"]:
                continue
            diff = fi["max_rel_diff"][name]
            equal = "equal" if diff <= fi["tolerance"] else "DIFFER"
            row(
                f"Fisher per volume ({m['precision']})",
                ref,
                m,
                f"{faster(ref['s'] / m['s'])}; {equal} (max rel. diff {diff:.1e})",
            )
        for name, m in methods.items():
            if m["used"] != name:
                notes.append(f"Fisher {name}: fell back to {m['used']}")
        if "compile" in methods:
            notes.append(
                f"Fisher compiled loop: first volume incl. compilation {fmt_seconds(methods['compile']['first_s'])}"
            )
        notes.append(
            "Fisher volumes/s: "
            + ", ".join(f"{n} {1 / m['s']:.2f}" for n, m in methods.items())
            + f"; method='auto' picks {fi['auto_picks']} here, {fi['auto_picks_paper']} for {PAPER_TASK_VOLUMES} volumes"
        )
    if "adaption" in results:
        ad = results["adaption"]
        ratio = ad["adaption"]["s"] / ad["plain"]["s"]
        row("adaption step", ad["plain"], ad["adaption"], f"{ratio:.2f}× the time")
        notes.append(f"adaption: {ad['sources']} sources, {ad['layers']} merged layers")
    lines.append("")
    lines += [f"- {n}" for n in notes]
    lines.append(f"- total: {results.get('total_s', 0):.0f} s")
    return "\n".join(lines) + "\n"
