"""``loramerge push``: upload an existing output to the Hub."""

from __future__ import annotations

import click

from loramerge.hub.publish import publish_output


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.argument("repo_id", metavar="ORG/NAME")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--commit-message", help="Commit message of the push.")
def push(path: str, repo_id: str, private: bool, commit_message: str | None) -> None:
    """Upload PATH (an output folder or file) to the Hub model repository ORG/NAME.

    The repository is created if needed. The token is HF_TOKEN or the saved login
    (`hf auth login`); HF_ENDPOINT selects another Hub. The folder is uploaded as is; a
    README.md written by loramerge gets the repository id in its loading example, and a folder
    without a README.md gets a generated model card.

    \b
    Examples:
      loramerge push merged me/math-code-lora
      loramerge push merged me/math-code-lora --private --commit-message "svd merge, rank 16"
    """
    result = publish_output(path, repo_id, private=private, commit_message=commit_message)
    click.echo(f"pushed {path} to {result.repo_id} (commit {result.commit}): {result.url}")
