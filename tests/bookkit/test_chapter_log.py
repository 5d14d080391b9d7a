"""bookkit.chapter_log: a chapter's warnings and library log lines go to its log file, never to its stderr."""

import subprocess
import sys

from lib.artifacts import REPO_ROOT


LOGGING_SCRIPT = """
import logging, sys, warnings
from transformers.utils import logging as hf_logging
from bookkit.chapter_log import log_to_file
path = log_to_file(sys.argv[1])
assert not path.exists()  # started afresh, and created only when something is logged
warnings.warn("a warning once per process", UserWarning)
hf_logging.get_logger("transformers.generation").warning("a library's log line")
logging.getLogger("peft").warning("a logger without a handler of its own")
logging.getLogger("torch").warning("torch's logger, which does not propagate")
print(path.read_text(), end="")
log_to_file(path)  # the next chapter in the same process: afresh, one handler, not two
logging.getLogger("torch").warning("after a second call")
print(path.read_text(), end="")
"""


def test_warnings_and_library_logs_go_to_the_chapter_log_not_stderr(tmp_path):
    """In a process of its own, as in a chapter's kernel (pytest replaces this process's stderr)."""
    stale = tmp_path / "logs" / "chapter.log"
    stale.parent.mkdir()
    stale.write_text("from an earlier run\n")
    done = subprocess.run([sys.executable, "-c", LOGGING_SCRIPT, str(stale)], capture_output=True, text=True,
                          cwd=REPO_ROOT, check=True)
    assert done.stderr == ""
    first, second = done.stdout.split("torch WARNING: after")
    assert "UserWarning: a warning once per process" in first and "transformers.generation WARNING: a library's" in first
    assert "peft WARNING: a logger without" in first and "torch WARNING: torch's logger" in first
    assert "earlier run" not in first and second == " a second call\n"
