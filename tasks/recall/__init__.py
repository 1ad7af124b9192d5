"""Real recall tasks (FDA, SWDE, SQuAD) under the "Just read twice" protocol, as an lm-eval task folder.

Point lm-eval's `include_path` at TASK_DIR; README.md lists the tasks and the metadata keys, and
PROTOCOL.md states the protocol rule by rule.
"""

from pathlib import Path

TASK_DIR = Path(__file__).parent
FIXTURE_DIR = TASK_DIR / "fixtures"  # tiny hand-made documents in the hub schema, for tests
