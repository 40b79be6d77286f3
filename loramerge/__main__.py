"""``python -m loramerge`` runs the CLI."""

from loramerge.cli import main

main()
