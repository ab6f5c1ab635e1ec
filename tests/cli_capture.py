"""``personalize ARGS`` in this process with stdout and stderr captured (usable from module-scoped fixtures,
where pytest's capsys is not)."""
from __future__ import annotations

import contextlib
import io


def run(args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``personalize ARGS``; an uncaught exception propagates (a real process
    would print a traceback)."""
    from personalize.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()
