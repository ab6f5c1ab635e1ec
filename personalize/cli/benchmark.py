"""``personalize benchmark ...``: validate a spec, run it (resumable, multi-process), report on it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .console import escaped, markup, out_console, say

app = typer.Typer(help="Head-to-head benchmarks: methods x concepts x prompts x seeds x inference settings, "
                       "every unit of work a row in SQLite (or PostgreSQL for several machines), ending in an "
                       "HTML report.\n\n"
                       "[bold]Examples[/bold]\n\n"
                       "  personalize benchmark validate bench.yaml\n\n"
                       "  personalize benchmark run bench.yaml --out runs/bench\n\n"
                       "  personalize benchmark status runs/bench/benchmark.sqlite\n\n"
                       "  personalize benchmark report runs/bench/benchmark.sqlite --out runs/bench/report",
                  no_args_is_help=True, rich_markup_mode="rich")

DB_ARG = typer.Argument(..., help="The run's database: OUT/benchmark.sqlite, or the postgresql:// URL given to "
                                  "'benchmark run --db'.")
SPEC_ARG = typer.Argument(..., help="Benchmark spec (YAML): base, evaluator, concepts, prompts, seeds, sampler, "
                                    "methods with train settings and inference sweeps.")


def _open(database: str):
    """The queue of a finished or running benchmark: a SQLite file or a postgresql:// URL."""
    from ..benchmark.db import open_db

    return open_db(database, create=False)


def _folder(value: Optional[str], option: str) -> Optional[Path]:
    """A folder option as a Path; an empty string (which Path reads as '.', the current folder) is refused."""
    from ..errors import BadInputError

    if value is None:
        return None
    if not value.strip():
        raise BadInputError(f"{option} is empty; pass a folder (write '.' for the current one)")
    return Path(value)


def _load(spec_path: Path, clip_weights: Optional[Path] = None, dino_weights: Optional[Path] = None):
    from ..benchmark.spec import load_spec
    from ..errors import BadInputError

    spec = load_spec(spec_path)
    for key, path in (("clip_weights", clip_weights), ("dino_weights", dino_weights)):
        if path is not None:
            from ..evaluation import registry as evaluators

            backend = evaluators.get(spec.evaluator["backend"])
            if key not in backend.options:  # it would be ignored without a word
                raise BadInputError(f"--{key.replace('_', '-')}: the spec's evaluator '{backend.name}' takes no "
                                    "weights file; drop the option (or use backend: clip)")
            if not path.is_file():
                raise BadInputError(f"--{key.replace('_', '-')} '{path}' does not exist; pass a weights file")
            spec.evaluator[key] = str(path.resolve())
    return spec


@app.command()
def validate(spec_path: Path = SPEC_ARG):
    """Check a spec before a long run: unknown keys, methods, knobs, concept folders, prompts.

    Prints what the run would do (rows per kind). Exit code 2 with one line on the first problem.

    [bold]Examples[/bold]

      personalize benchmark validate bench.yaml

      personalize benchmark validate examples/toy_benchmark.yaml   # the toy world's benchmark, runs on a CPU
    """
    from collections import Counter

    from ..benchmark.plan import build_plan, resolve_concepts

    spec = _load(spec_path)
    units = build_plan(spec)
    kinds = Counter(u.kind for u in units)
    table = Table(title=escape(f"{spec.name}: valid"), show_header=True)
    concepts = resolve_concepts(spec)
    for col in ("method", "train", "settings", "prompted as"):
        table.add_column(col)
    for m in spec.methods:
        table.add_row(*escaped(m.label, ", ".join(f"{k}={v}" for k, v in m.train.items()) or "paper defaults",
                               " | ".join("; ".join(f"{k}: {v}" for k, v in sw.items()) for sw in m.sweeps) or "default",
                               concepts[0].prompts(m.method)[0] if concepts else "(no concepts)"))
    out_console.print(table)
    say("{} concept(s): {}; every method keeps its last training step", len(concepts),
        ", ".join(c.name for c in concepts))
    if spec.comparability:
        say("comparable with: {}", spec.comparability["table"])
    say("rows: {} train, {} generate, {} score ({} in all); base {}; evaluator {}", kinds["train"], kinds["generate"],
        kinds["score"], len(units), spec.base, spec.evaluator["backend"])


@app.command()
def run(
    spec_path: Path = SPEC_ARG,
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (database, concepts, images); default "
                                                         "'<spec name>_out'. Re-use it to resume."),
    clip_weights: Optional[Path] = typer.Option(None, "--clip-weights", help="Local OpenAI CLIP ViT-B/32 weights "
                                                "(open_clip state dict; run with QuickGELU) instead of downloading them."),
    dino_weights: Optional[Path] = typer.Option(None, "--dino-weights", help="Local DINO ViT-S/16 weights (timm "
                                                "state dict) instead of downloading them."),
    db: Optional[str] = typer.Option(None, "--db", help="postgresql://user@host/dbname: keep the row queue in "
                                     "PostgreSQL so processes on several machines share it (OUT must then be one "
                                     "shared folder). Default: OUT/benchmark.sqlite."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
):
    """Run (or resume) a benchmark. Every unit of work is a row in OUT/benchmark.sqlite: re-running skips what
    is done and retries what failed, so a killed run loses nothing it finished.

    Several processes share the rows without overlap (each row runs whole in one process; one process per GPU,
    each on the GPU of its LOCAL_RANK; on a CPU-only machine the same command starts N CPU processes):
    [bold]torchrun --nproc_per_node 8 -m personalize.cli benchmark run bench.yaml --out runs/bench[/bold]
    ([bold]accelerate launch --num_processes 8 -m personalize.cli ...[/bold] works the same on GPUs.)

    [bold]Several machines[/bold]: put the queue in PostgreSQL with [bold]--db postgresql://user@host/dbname[/bold]
    (one empty database per run; pip install 'psycopg\\[binary]') and OUT on a folder every machine mounts (NFS
    is fine for the outputs; SQLite itself is refused on a network filesystem). Processes meet only in the
    database, so each machine may simply run its own launch, joining or leaving at any time:
    [bold]accelerate launch --num_processes 8 -m personalize.cli benchmark run bench.yaml --out /shared/bench
    --db postgresql://...[/bold]; one launch across nodes works too ([bold]accelerate launch --num_machines M
    --machine_rank R --main_process_ip HOST0 --num_processes 8*M -m personalize.cli ...[/bold] on each machine R).
    Rows of a machine that died go back to the queue once its heartbeat is 2 minutes old.

    [bold]Exit code[/bold]: 0 when every row is done; 1 when rows failed (each is listed; run the same command
    again to retry them); 2 with one line on stderr for a bad spec or option (nothing is run).

    [bold]Examples[/bold]

      personalize benchmark run bench.yaml --out runs/bench

      personalize benchmark run bench.yaml --out runs/bench --clip-weights clip.safetensors --dino-weights dino.safetensors   # offline

      torchrun --nproc_per_node 8 -m personalize.cli benchmark run bench.yaml --out runs/bench   # 8 processes

      personalize benchmark run bench.yaml --out /shared/bench --db postgresql://bench@db-host/bench1   # any machine

    Then:  personalize benchmark report runs/bench/benchmark.sqlite --out runs/bench/report
    """
    from ..benchmark.db import check_url
    from ..benchmark.runner import run_benchmark
    from ..paths import check_output, inside

    if db is not None:
        check_url(db)  # one line that never shows the password, before anything is read or written
    out = _folder(out, "--out")
    spec = _load(spec_path, clip_weights, dino_weights)
    out = out or inside(Path("."), f"{spec.name}_out")  # the spec's name: a folder here, never elsewhere
    check_output(out, folder=True)
    summary = run_benchmark(spec, out, db_url=db, progress=progress)
    c = summary.counts
    say("{}/{} rows done ({} this run), {} failed, {} blocked; database {}", c["done"], c["total"], summary.ran,
        c["failed"], c["pending"], summary.db)
    if summary.failures:
        for key, error in summary.failures:
            _failed(key, error)
        out_console.print("fix the cause and run the same command again: finished rows are kept, failed ones retried")
        raise typer.Exit(1)
    run_dir = f" --run-dir {out}" if db else ""
    say("report: personalize benchmark report {}{} --out {}", summary.db, run_dir, Path(out) / "report")


def _failed(key: str, error: str) -> None:
    """One failed row: its key and the first line of its error."""
    out_console.print(markup("[red]failed[/red] {}: {}", key, (error.splitlines() or [""])[0]), highlight=False)


@app.command()
def status(database: str = DB_ARG):
    """Rows per status and the first failures.

    [bold]Examples[/bold]

      personalize benchmark status runs/bench/benchmark.sqlite

      watch -n 30 personalize benchmark status runs/bench/benchmark.sqlite   # follow a long run

      personalize benchmark status postgresql://bench@db-host/bench1   # a run over several machines
    """
    db = _open(database)
    c = db.counts()
    out_console.print(f"{c['done']}/{c['total']} done, {c['running']} running, {c['pending']} pending, {c['failed']} failed")
    for key, error in db.failures():
        _failed(key, error)
    db.close()


@app.command()
def report(
    database: str = DB_ARG,
    out: str = typer.Option(..., "--out", help="Folder for index.html (self-contained), report.md and plots/."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="The run's output folder (images, concepts); "
                                           "default: the SQLite file's folder, or for PostgreSQL the --out the "
                                           "run was given, if it exists here."),
):
    """Write the report: tables with the best value per column highlighted, image grids (same prompt and seed
    for every method), CLIP-T vs CLIP-I / DINO Pareto plots, size and time columns.

    [bold]Examples[/bold]

      personalize benchmark report runs/bench/benchmark.sqlite --out runs/bench/report

      personalize benchmark report runs/bench/benchmark.sqlite --out report/ && open report/index.html

      personalize benchmark report postgresql://bench@db-host/bench1 --run-dir /shared/bench --out report/
    """
    from ..benchmark.db import is_postgres_url
    from ..benchmark.report import write_report
    from ..errors import BadInputError
    from ..paths import check_output

    out, run_dir = _folder(out, "--out"), _folder(run_dir, "--run-dir")
    check_output(out, folder=True)

    db = _open(database)
    rows, meta = db.rows(), db.meta()
    db.close()
    if run_dir is None:
        recorded = meta.get("out") if is_postgres_url(database) else str(Path(database).resolve().parent)
        run_dir = Path(recorded) if recorded else None
    if run_dir is None or not run_dir.is_dir():
        raise BadInputError(f"the run's output folder '{run_dir}' is not here; pass --run-dir with the folder "
                            "given to 'benchmark run --out'")
    index, md = write_report(rows, run_dir.resolve(), out, title=f"Benchmark: {meta.get('spec_name', '')}")
    say("wrote {} and {}", index, md)
