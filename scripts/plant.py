"""Plant one named bug (a text replacement) in a source file, run a test selection, restore the file.

    python scripts/plant.py FILE OLD NEW -- pytest args...

Exits 0 when the tests FAIL under the plant (the bug is caught), 1 when they pass (a blind spot)."""

import subprocess
import sys
from pathlib import Path

# pytest with one torch thread (tests/conftest.py asks for two, which is slower on a shared CPU)
ONE_THREAD = (
    "import sys, torch; torch.set_num_threads(1); torch.set_num_threads = lambda n: None; "
    "import pytest; sys.exit(pytest.main(sys.argv[1:]))"
)
path, old, new = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
args = sys.argv[sys.argv.index("--") + 1 :]
text = path.read_text()
if text.count(old) != 1:
    sys.exit(f"{path}: {old!r} occurs {text.count(old)} times, expected once")
try:
    path.write_text(text.replace(old, new))
    rc = subprocess.call([sys.executable, "-c", ONE_THREAD, "-q", "-p", "no:cacheprovider", *args])
finally:
    path.write_text(text)
print("CAUGHT" if rc != 0 else "SURVIVED (the tests pass with the bug planted)")
sys.exit(0 if rc != 0 else 1)
