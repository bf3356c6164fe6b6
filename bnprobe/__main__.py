"""``python -m bnprobe``."""

from .cli.main import main

main()
