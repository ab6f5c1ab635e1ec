"""CPU time of ``personalize --help`` and of every subcommand's ``--help``.

    python benchmarks/cli_startup.py [--repeat 5] [--commands "train,benchmark run"]

Each command line runs as ``python -m personalize.cli ... --help`` in a fresh process (the console script's
path, which also exists in older checkouts, for before/after numbers: run it with that checkout first on
PYTHONPATH); its CPU time is the child's user + system time from ``os.wait4`` (resource usage of that
process alone, not the wall clock, so a busy machine changes it little; the child runs in the checkout whose
``personalize`` this script imports). Prints one JSON line per command:
{"command", "cpu_s" (min over the runs), "runs" (every run's CPU seconds), "exit"}, then a summary line
{"max_cpu_s", "commands"}. The goal (issue 25): under 1 s of CPU for each.

The commands are read from the app itself (typer's click group), so a new command is measured without an edit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def commands() -> list[list[str]]:
    """Every command path of the app: [] (the app), ["train"], ..., ["benchmark", "run"], ..."""
    import typer

    from personalize.cli.app import app

    def walk(command, path):
        yield path
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, path + [name])

    return list(walk(typer.main.get_command(app), []))


def cpu_seconds(argv: list[str]) -> tuple[float, int]:
    """(user + system CPU seconds, exit status) of one run of ``argv``, output discarded. It runs in the folder
    above the ``personalize`` package imported here (``python -m`` puts the working folder first on the path),
    so the child measures the same checkout."""
    import personalize

    root = Path(personalize.__file__).resolve().parents[1]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    return usage.ru_utime + usage.ru_stime, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command; the minimum is reported")
    parser.add_argument("--commands", default=None,
                        help="comma-separated command paths ('train,benchmark run'); default: every command")
    args = parser.parse_args()
    paths = ([c.split() for c in args.commands.split(",")] if args.commands is not None else commands())
    worst = 0.0
    for path in paths:
        argv = [sys.executable, "-m", "personalize.cli", *path, "--help"]
        runs = [cpu_seconds(argv) for _ in range(args.repeat)]
        best = min(cpu for cpu, _ in runs)
        worst = max(worst, best)
        print(json.dumps({"command": " ".join(["personalize", *path, "--help"]), "cpu_s": round(best, 3),
                          "runs": [round(cpu, 3) for cpu, _ in runs], "exit": runs[-1][1]}), flush=True)
    print(json.dumps({"max_cpu_s": round(worst, 3), "commands": len(paths)}))


if __name__ == "__main__":
    main()
