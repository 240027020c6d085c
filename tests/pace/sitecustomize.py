"""Test instrumentation for processes a test does not start itself (a submitit job started by a sweep): with
PYTHONPATH=tests/pace and ERG_TEST_PACE=<markers folder>:<phase>:<step>, every Python process that can import
the project paces its training runs as tests/stop_worker.py does (a marker file, then a pause)."""

import os

if os.environ.get("ERG_TEST_PACE"):
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    out, phase, step = os.environ["ERG_TEST_PACE"].rsplit(":", 2)

    from tests.stop_worker import install

    install(Path(out), phase, int(step))
