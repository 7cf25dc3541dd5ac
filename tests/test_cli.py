import subprocess
import sys
import textwrap

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


def test_the_package_imports_its_modules_on_first_use():
    """`import hyperseg` imports no torch; hyperseg.predict stays the function when the module of
    that name is imported (the import system binds submodules to their package)."""
    script = textwrap.dedent("""
        import sys
        import hyperseg
        assert "torch" not in sys.modules, "import hyperseg imported torch"
        assert hyperseg.__version__ and "build" in dir(hyperseg)
        from hyperseg.predict import ImageError
        assert callable(hyperseg.predict) and hyperseg.predict.__name__ == "predict"
        assert hyperseg.build.__module__ == "hyperseg.model" and hyperseg.ops.patch_conv2d
        try:
            hyperseg.no_such_name
        except AttributeError as err:
            assert "no_such_name" in str(err)
        else:
            raise AssertionError("no AttributeError")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
