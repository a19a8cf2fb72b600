"""`python -m mcloudtt_adapter`."""

from .cli import main

main()
