import subprocess
import sys

from hyperseg.__main__ import main


def test_list_prints_every_model(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("hyperseg-m-cityscapes", "hyperseg-s-cityscapes", "hyperseg-s-camvid",
                 "hyperseg-l-camvid", "hyperseg-l-voc"):
        assert name in out


def test_module_help_runs():
    result = subprocess.run([sys.executable, "-m", "hyperseg", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "list" in result.stdout
