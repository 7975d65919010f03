"""How and where things run (trainer, families, data, checkpoints, entry points).

Importing any launch module first imports `launch.fs`, which points every GCS client at
$STORAGE_EMULATOR_HOST when that is set, before the clients read their settings.
"""

from launch import fs as _fs  # noqa: F401  (import for its side effect)
