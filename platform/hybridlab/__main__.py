"""`python -m hybridlab ...` — the same as the `hybridlab` command (used as the Ray job entrypoint)."""

from hybridlab.cli import main

main()
