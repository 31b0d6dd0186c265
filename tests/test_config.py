"""`--config` flags: every sequence field of every config in configs/ takes overrides."""

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

_PROGRAM = """
import sys
from absl import app
from fourm.config import define_config_flag
C = define_config_flag(sys.argv[1])
def main(argv):
    c = C.value
    for key in sys.argv[2].split("."):
        c = c[key]
    print(repr(c))
app.run(main, argv=[sys.argv[0]] + sys.argv[3:])
"""


def _value(config: str, field: str, *overrides: str) -> str:
    r = subprocess.run([sys.executable, "-c", _PROGRAM, config, field, *overrides], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


@pytest.mark.parametrize("config,field,values", [
    ("pretokenize", "modalities", ("rgb@64", "caption")),  # a list in the config file
    ("bench", "only", ("model", "scenes")),
    ("pretrain:smoke", "model.domains_in", ("rgb@64",)),
])
def test_sequence_fields_take_overrides(config, field, values):
    flags = [f"--config.{field}={v}" for v in values]  # ml-collections: one flag per element
    assert _value(config, field, *flags) == repr(tuple(values))
    assert _value(config, field, f"--config.{field}={values!r}") == repr(tuple(values))  # literal
