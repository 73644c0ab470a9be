"""`python -m livekv` is the `livekv` command."""
import sys
from pathlib import Path

# From a checkout's root, `python -m` puts the root first on sys.path, where the subpackages'
# folders (kernels/, incremental/) shadow installed packages of the same names: transformers
# imports Hugging Face's `kernels`. The installed livekv never needs the root on the path.
_root = Path(sys.path[0] or ".").resolve()
if (_root / "livekv" / "__main__.py").is_file() and (_root / "kernels" / "__init__.py").is_file():
    sys.path.pop(0)

from livekv.lsp_server.cli import main  # noqa: E402

sys.exit(main())
