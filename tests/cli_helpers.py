"""Running the CLI in-process and checking its failures, shared by the CLI tests."""

from __future__ import annotations

from click.testing import CliRunner, Result

from loramerge.cli import main


def run_cli(*args: object) -> Result:
    """``loramerge ARGS…`` through click's test runner (stdout and stderr kept apart)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_failure(result: Result, *fragments: str) -> None:
    """Exit status 1, exactly one ``error: …`` line naming every fragment, and no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
