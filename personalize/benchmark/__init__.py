"""Head-to-head benchmarks: a spec becomes rows of work in SQLite, run by any number of processes, ending in a report."""
