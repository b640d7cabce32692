"""The ``tmerge`` command: one sub-command per stage, ``key=value`` overrides after it.

    tmerge data                                  # generate the embedded default datasets
    tmerge task1 trainer.max_epochs=3            # M1 on HCP labels 1:7
    tmerge task2                                 # M2, initialised from M1, labels 8:14
    tmerge source labels=all split=all           # an All-HCP baseline model
    tmerge task1 --profile paper                 # the paper's scale (experiments/paper/)
    tmerge task1 --show-config                   # print the resolved config and exit

Configs: dataclass defaults < ``experiments/[paper/]<stage>.yaml`` < command line. Errors in the
user's input (files, keys, missing runs) print one line and exit with status 2; ``--debug`` (or
``TMERGE_DEBUG=1``) prints their traceback too. Any other exception is a bug in tmerge, not in the
input: it always prints its traceback, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tmerge.config import PROFILES, compose, to_yaml
from tmerge.errors import TmergeError

log = logging.getLogger("tmerge")


@dataclass(frozen=True)
class Command:
    """A sub-command: the stage module that owns it, the names of its config schema and runner
    there (imported lazily, so that ``tmerge --help`` does not import torch), its experiment file
    and the overrides it presets. Short keys come from the module's ``ALIASES``, if any."""

    help: str
    module: str
    schema: str
    run: str
    experiment: str | None = None
    preset: tuple[str, ...] = ()  # overrides applied before the user's (e.g. init=timm)
    files: bool = False  # bare arguments (no "=") are YAML files layered below the overrides

    def load(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.module), attr)


_SOURCE = ("tmerge.stages.source", "SourceStageConfig", "run_source")
_TARGET = ("tmerge.stages.target", "TargetStageConfig", "run_target")

COMMANDS: dict[str, Command] = {
    "data": Command(
        "generate the embedded default datasets (HCP-like and BraTS-like)",
        "tmerge.stages.data",
        "DataStageConfig",
        "run_data",
        "data",
    ),
    "task1": Command("train M1 on HCP labels 1:7 (paper task 1) and compute its Fisher", *_SOURCE, "task1"),
    "task2": Command(
        "train M2 from M1 on HCP labels 8:14 (paper task 2) and compute its Fisher", *_SOURCE, "task2"
    ),
    "source": Command(
        "train another source model, e.g. the All-HCP baselines (labels=all split=all)", *_SOURCE, "source"
    ),
    "timm": Command(
        "T-IMM on BraTS: adaption (learn α per layer) then fine-tune and test",
        *_TARGET,
        "brats",
        ("init=timm",),
    ),
    "imm": Command(
        "IMM on BraTS: uniform Fisher-weighted merge, fine-tune and test", *_TARGET, "brats", ("init=imm",)
    ),
    "target": Command(
        "one BraTS run with any initialisation (init=none|m1|m2|imm|mean-imm|timm|all-hcp…)",
        *_TARGET,
        "brats",
    ),
    "forgetting": Command(
        "paper Table 4: P of M1, M2, IMM and T-IMM with the source tasks' S on the HCP test split",
        "tmerge.stages.forgetting",
        "ForgettingConfig",
        "run_forgetting",
        "forgetting",
    ),
    "sweep": Command(
        "every initialisation in `inits` (per seed in `seeds`) on identical splits",
        "tmerge.stages.sweep",
        "TargetStageConfig",
        "run_sweep",
        "brats",
    ),
    "shallow": Command(
        "the premise checks' shallow baseline: a per-voxel MLP on intensities, no convolutions, on a target's splits",
        "tmerge.stages.shallow",
        "TargetStageConfig",
        "run_shallow",
        "brats",
    ),
    "noise-source": Command(
        "the negative control's source: a finished source run with its fused layers replaced by seeded noise",
        "tmerge.stages.control",
        "NoiseSourceConfig",
        "run_noise_source",
    ),
    "merge": Command(
        "merge any models whose state dicts match, by a recipe: tmerge merge RECIPE.yaml [key=value …]",
        "tmerge.stages.merge",
        "MergeConfig",
        "run_merge",
        files=True,
    ),
    "score": Command(
        "grade a folder of predicted BraTS label maps against true ones (Dice, HD95 per region, a CSV)",
        "tmerge.stages.score",
        "ScoreConfig",
        "run_score",
    ),
    "predict": Command(
        "label maps for new cases with a finished run's network: tmerge predict run=… input=… output=…",
        "tmerge.stages.predict",
        "PredictConfig",
        "run_predict",
    ),
    "export": Command(
        "a finished run's network as TorchScript + safetensors + a JSON of its preprocessing and labels",
        "tmerge.stages.export",
        "ExportConfig",
        "run_export",
    ),
    "report": Command(
        "the paper's tables and figures with paired statistics from the finished runs (runs/report/)",
        "tmerge.report",
        "ReportConfig",
        "run_report",
        "report",
    ),
    "bench": Command(
        "time the fast paths side by side: training step, Lightning loop, data, Fisher, adaption (runs/bench/)",
        "tmerge.bench",
        "BenchConfig",
        "run_bench",
    ),
}


def configure_logging() -> None:
    """``[tmerge] …`` progress lines on stderr; Lightning's banners and known-harmless warnings
    silenced so that what remains is worth reading."""
    import warnings

    ours = logging.getLogger("tmerge")
    # Bind to the sys.stderr of *this* call (a previous call's stream may be gone, e.g. when
    # main() runs several times in one process, as in the tests).
    for old in [h for h in ours.handlers if getattr(h, "tmerge_cli", False)]:
        ours.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[tmerge] %(message)s"))
    handler.tmerge_cli = True  # type: ignore[attr-defined]
    ours.addHandler(handler)
    # Progress lines once, from global rank 0: the other DDP ranks re-run this command.
    ours.setLevel(logging.INFO if _env_rank() == 0 else logging.WARNING)
    ours.propagate = False
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (
        r".*isinstance\(treespec, LeafSpec\)",  # Lightning internals on newer torch
        r"Checkpoint directory .* exists and is not empty",  # the run folder holds its config first
        r".*does not have many workers",  # in-memory datasets: workers would only add overhead
        # A resumed run's earlier CSV log has been kept aside (loggers._keep_previous_csv).
        r"Experiment logs directory .* exists and is not empty",
    ):
        warnings.filterwarnings("ignore", message=message)


def _env_rank() -> int:
    """This process's global rank as launchers announce it (Lightning's DDP launcher, torchrun,
    SLURM), read without importing Lightning; 0 when none is set."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmerge",
        description="T-IMM: transfer learning by adaptive merging of multiple models.",
        epilog="Run `tmerge <command> --help` for a command's options; `--show-config` prints every key.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=cmd.help,
            description=f"{cmd.help}. Overrides are key=value pairs (OmegaConf dotlist), e.g. trainer.max_epochs=3.",
        )
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        p.add_argument(
            "--profile",
            choices=PROFILES,
            default=os.environ.get("TMERGE_PROFILE", "default"),
            help="experiment family: 'default' (embedded data, CPU-sized) or 'paper' (128³, full lengths)",
        )
        p.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
        p.add_argument(
            "--debug",
            action="store_true",
            help="print the traceback of an error in the input too (also: TMERGE_DEBUG=1)",
        )
    return parser


def _comment_block(described: dict[str, Any]) -> str:
    """``{"target": {…}}`` as ``# target:`` comment lines."""
    lines = []
    for key, value in described.items():
        if isinstance(value, dict):
            lines.append(f"# {key}:")
            lines += [f"#   {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"# {key}: {value}")
    return "\n".join(lines) + "\n"


def debug_requested(flag: bool = False) -> bool:
    """Whether to print tracebacks of :class:`~tmerge.errors.TmergeError`: ``--debug``, or
    ``TMERGE_DEBUG`` set to anything but empty, ``0``, ``false`` or ``no``."""
    return flag or os.environ.get("TMERGE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def command_config(args: argparse.Namespace) -> Any:
    """The config a parsed command line runs with: the command's schema, its experiment file
    under the profile, its presets and the overrides (bare arguments: YAML files, where the
    command takes them).

    Raises:
        ConfigError: an unknown key, a wrong type or an unreadable file, naming it.
    """
    cmd = COMMANDS[args.command]
    files = [a for a in args.overrides if "=" not in a] if cmd.files else []
    overrides = [a for a in args.overrides if a not in files]
    return compose(
        cmd.load(cmd.schema),
        cmd.experiment,
        [*cmd.preset, *overrides],
        profile=args.profile,
        aliases=getattr(importlib.import_module(cmd.module), "ALIASES", {}),
        files=files,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tmerge`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging()
    cmd = COMMANDS[args.command]
    try:
        cfg = command_config(args)
        if args.show_config:
            print(to_yaml(cfg), end="")
            # What the config resolves to beyond its keys (a target's channels, labels and output
            # mode, read from the dataset), as YAML comments so that the output stays a config.
            describe = getattr(importlib.import_module(cmd.module), "describe", None)
            if describe is not None:
                print(_comment_block(describe(cfg)), end="")
            return 0
        cmd.load(cmd.run)(cfg)
    except TmergeError as exc:
        # The message names the file or key at fault; the traceback only helps to debug tmerge.
        if debug_requested(args.debug):
            traceback.print_exc(file=sys.stderr)
        # One line, whatever a library's text embedded in the message holds.
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"tmerge {args.command}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"tmerge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - not the input's fault: say so, with the traceback
        traceback.print_exc(file=sys.stderr)
        print(
            f"tmerge {args.command}: internal error ({type(exc).__name__}): this is a bug in tmerge, "
            "not in the input; the traceback above shows where",
            file=sys.stderr,
        )
        return 1  # the status Python gives an uncaught exception, as before
    return 0


if __name__ == "__main__":
    sys.exit(main())
