"""`python -m hybrid.cli ...`: the same as the `kimi-hybrid` command."""
from hybrid.cli.main import main

main()
