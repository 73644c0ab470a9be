"""`python -m livekv` is the `livekv` command."""
import sys

from livekv.lsp_server.cli import main  # livekv/__init__ drops a checkout's root from sys.path

sys.exit(main())
