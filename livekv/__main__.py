"""`python -m livekv` is the `livekv` command."""
import sys

from livekv.lsp_server.cli import main

sys.exit(main())
