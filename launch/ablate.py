"""`reid-ablate` from a source checkout: see pipeline/cli/ablate.py (`python launch/ablate.py --help`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli.ablate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
