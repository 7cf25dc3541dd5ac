import argparse
import subprocess
import sys
import textwrap

import pytest

import hyperseg
import hyperseg.commands as cli_commands
from hyperseg.__main__ import build_parser, main


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


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hyperseg {hyperseg.__version__}"


def test_help_list_and_usage_errors_do_not_import_torch():
    """The command line checks its arguments before importing torch, timm or triton (about 3 s
    on 2 CPU cores): --help, --version, list and a wrong argument answer at once."""
    script = textwrap.dedent("""
        import sys
        from hyperseg.__main__ import main
        for argv in (["--help"], ["--version"], ["list"], ["predict", "--help"],
                     ["train", "--help"], ["eval", "--help"], ["export", "--help"],
                     ["convert", "--help"], ["predict", "missing.png", "--model", "hyperseg-m",
                     "--out", "o"], ["eval", "--weights", "missing.pth", "--data", "synthetic"]):
            try:
                main(argv)
            except SystemExit:
                pass
        heavy = sorted(m for m in ("torch", "timm", "triton", "torchvision") if m in sys.modules)
        print("imported:", heavy, file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "imported: []" in result.stderr, result.stderr[-2000:]
    assert "missing.png: no such file" in result.stderr
    assert "no checkpoint file at 'missing.pth'" in result.stderr


def _commands():
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices


def test_every_command_and_option_has_help_text():
    for name, command in _commands().items():
        assert command.description, name
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings or action.dest}"


def test_predict_and_eval_share_option_names_defaults_and_choices():
    commands = _commands()

    def options(name):
        return {s: (a.default, a.choices, a.nargs, a.const) for a in commands[name]._actions
                for s in a.option_strings}
    predict, evaluate, train = options("predict"), options("eval"), options("train")
    for option in ("--size", "--batch-size", "--tta", "--tta-scales", "--device", "--backend",
                   "--quiet", "-q", "-b", "--weights", "--model"):
        assert predict[option] == evaluate[option], option
    assert predict["--batch-size"][0] == 1 and predict["--tta"][1:] == (("flip", "ms"), "?", "ms")
    for option in ("--device", "--backend", "--quiet", "--workers"):
        assert train[option] == evaluate[option], option


def test_a_clone_named_hyperseg_in_the_current_folder(tmp_path):
    """Python started in the folder that holds a clone named hyperseg takes the clone's folder
    (no __init__.py) for a namespace package when the project is installed in editable mode
    (setuptools' finder comes after Python's path search). Then `python -m hyperseg` still works
    and says why `import hyperseg` does not; with a regular install there is nothing to say."""
    clone = tmp_path / "hyperseg"
    clone.mkdir()
    (clone / "README.md").write_text("a clone\n")
    probe = subprocess.run([sys.executable, "-c", "import hyperseg; print(hyperseg.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    shadowed = probe.stdout.strip() == "None"
    result = subprocess.run([sys.executable, "-m", "hyperseg", "--version"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"hyperseg {hyperseg.__version__}"
    if shadowed:
        assert "rename the clone" in result.stderr and str(clone) in result.stderr
    else:
        assert result.stderr == ""
    # started elsewhere, nothing is said
    result = subprocess.run([sys.executable, "-m", "hyperseg", "--version"], capture_output=True,
                            text=True, cwd=clone, timeout=60)
    assert result.returncode == 0 and result.stderr == ""


def test_export_and_eval_check_their_output_files_before_loading_a_model(tmp_path, capsys,
                                                                         monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(cli_commands, "_load_model", no_model)
    assert main(["export", "--model", "hyperseg-m", "--onnx", str(tmp_path / "no/m.onnx")]) == 2
    assert f"the folder '{tmp_path / 'no'}' of" in capsys.readouterr().err
    assert main(["eval", "--model", "hyperseg-m", "--data", "synthetic:8,size=64",
                 "--json", str(tmp_path / "no/r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--weights", str(tmp_path / "none.safetensors"), "--data",
                 "synthetic"]) == 2
    assert "no checkpoint file at" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


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


def test_crop_takes_hxw_or_n_with_sides_of_32_or_more(capsys):
    parser = build_parser()
    assert parser.parse_args(["train", "--out", "o", "--crop", "64"]).crop == (64, 64)
    assert parser.parse_args(["train", "--out", "o", "--crop", "64x96"]).crop == (64, 96)
    for value, message in (("16", "expected HxW or N with sides >= 32, got '16'"),
                           ("big", "expected HxW or N, got 'big'")):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "--out", "o", "--crop", value])
        assert message in capsys.readouterr().err
