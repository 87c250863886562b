import sys

from napari_meddiff.cli import main

sys.exit(main())
