"""User strings are shown as typed, never read as rich markup (issue 25 item 7): a class phrase, a token, paths
and a prompt holding ``[/]`` or ``[bold]`` go through train, generate, export and inspect with exit 0 and appear
literally; error messages quoting such strings too."""
from __future__ import annotations

import pytest
from cli_capture import run
from conftest import make_photos

SUPERCLASS = "teddy [/] [bold]x"
TOKEN = "<t[bold]>"  # brackets are allowed in a token ('/' is not)


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    """A concept trained through the CLI with markup in its class phrase, token and path: (path, run output)."""
    root = tmp_path_factory.mktemp("markup")
    photos = make_photos(root / "photos")
    out = root / "a[" / "]b [bold]c.safetensors"  # the path holds '[/]' and an opening tag
    out.parent.mkdir()
    result = run(["train", "--method", "textual-inversion", "--base", "tiny", "--images", photos, "--superclass",
                  SUPERCLASS, "--token", TOKEN, "--out", out, "--steps", "1", "--batch-size", "1"])
    return out, result


def test_train_shows_paths_as_typed(concept):
    out, (code, stdout, err) = concept
    assert code == 0, err
    assert out.is_file() and f"wrote concept {out} (" in stdout


def test_inspect_shows_header_values_as_typed(concept):
    out, _ = concept
    code, stdout, err = run(["inspect", out])
    assert code == 0, err
    assert str(out) in stdout and repr(SUPERCLASS) in stdout and repr(TOKEN) in stdout


def test_generate_and_export_show_their_strings_as_typed(concept, tmp_path):
    out, _ = concept
    samples = tmp_path / "s[" / "]amples [bold]"
    code, stdout, err = run(["generate", "--base", "tiny", "--concept", out, "--prompt", f"a {TOKEN} [/] [bold]",
                             "--out", samples, "--num-images", "1", "--steps", "1"])
    assert code == 0, err
    assert f"wrote 1 image(s) to {samples}" in stdout
    folder = tmp_path / "e[" / "]xport [bold]"
    code, stdout, err = run(["export", out, "--format", "diffusers", "--out", folder])
    assert code == 0, err
    assert f"wrote {folder} (" in stdout


def test_generate_warning_shows_the_token_as_typed(concept, tmp_path):
    out, _ = concept
    code, _, err = run(["generate", "--base", "tiny", "--concept", out, "--prompt", "a teddy [/] [bold]",
                        "--out", tmp_path / "w", "--num-images", "1", "--steps", "1"])
    assert code == 0 and f"warning: the prompt does not contain {TOKEN}" in err


@pytest.mark.parametrize("args, shown", [
    (["inspect", "no[/]pe [bold].safetensors"], "no[/]pe [bold].safetensors"),
    (["methods", "perf[/]usion [bold]"], "perf[/]usion [bold]"),
    (["train", "--base", "tiny", "--images", "mis[/]sing [bold]", "--superclass", "x", "--token", "<x>", "--out",
      "x.safetensors"], "mis[/]sing [bold]"),
])
def test_errors_quote_user_strings_as_typed(args, shown, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(args)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and shown in err


def test_say_escapes_fields_but_keeps_the_template_markup():
    from rich.console import Console

    from personalize.cli.console import markup

    console = Console(width=200, force_terminal=False)
    with console.capture() as cap:
        console.print(markup("[bold]{}[/bold] and {!r} ({:,} bytes)", "a[/]b [red]", "[x]", 1234))
    assert cap.get().strip() == "a[/]b [red] and '[x]' (1,234 bytes)"
