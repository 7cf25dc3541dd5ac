"""A faster Triton interpreter for the tests, computing exactly what the plain one computes.

Under ``TRITON_INTERPRET=1`` two things cost the tests about half their interpreter time without
changing any result (measured on the 3x3 ``patch_conv2d`` forward and backward of
tests/test_kernel_patch_conv_backward.py's channel-tail case: 32 s plain, 16 s with both):

- **The overflow check of integer arithmetic.** Every 32-bit integer ``+``, ``-`` and ``*``
  (each index and offset computation) is redone in 64 bits and compared with the 32-bit range,
  for a ``device_assert`` that the interpreter then drops, because it runs without ``debug``
  (``InterpreterOptions.debug`` is never set). ``install()`` switches the check off in the
  interpreter's options while ``debug`` is off; int32 arithmetic still wraps as before.
- **Patching the language again at every helper call.** A launch patches ``triton.language``
  with the interpreter's implementations (``interpreter._patch_lang`` of the kernel), runs the
  grid and restores the patch; but every call of a ``@triton.jit`` helper inside the kernel
  (``_common.border_index``, Triton's own ``tl.zeros``...) patches its module again, for each
  program: about 2 ms a call, spent listing the module's members in search of builtins that the
  first patch of the launch already replaced. ``install()`` patches each module (a helper's
  globals) once per launch; the launch's own patch and its restore are untouched.

tests/test_interpreter_utils.py runs kernels with and without these and compares the results bit
for bit. They apply only to an interpreter of the structure they change (Triton 3.x); elsewhere,
or with ``HYPERSEG_PLAIN_INTERPRETER=1``, the interpreter is left as it is (the tests are then
slower, not different).
"""
import contextlib
import dataclasses
import os

_STATE = {}        # "plain": what install() replaced, while it is installed


def _interpreter():
    """Triton's interpreter module if it has what ``install`` changes, else None."""
    from triton.runtime import interpreter
    needed = ("GridExecutor", "_patch_lang", "_LangPatchScope", "interpreter_builder")
    if not all(hasattr(interpreter, name) for name in needed):
        return None
    options = getattr(interpreter.interpreter_builder, "options", None)
    if not (dataclasses.is_dataclass(options) and hasattr(options, "sanitize_overflow")
            and hasattr(options, "debug")):
        return None
    return interpreter


def install() -> bool:
    """Make the interpreter faster (once); True when active."""
    if installed():
        return True
    if os.environ.get("HYPERSEG_PLAIN_INTERPRETER") == "1":
        return False
    interpreter = _interpreter()
    if interpreter is None:
        return False
    builder = interpreter.interpreter_builder
    patch_lang, run_grid = interpreter._patch_lang, interpreter.GridExecutor.__call__
    options = builder.options
    patched = set()          # ids of the globals patched during the launch in progress

    def patch_once_per_launch(fn):
        key = id(fn.__globals__)
        if key in patched:
            return interpreter._LangPatchScope()      # nothing to restore
        patched.add(key)
        return patch_lang(fn)

    def launch(self, *args, **kwargs):
        patched.clear()      # the launch's own patch (of the kernel's module) comes first
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            patched.clear()

    if not options.debug:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    interpreter._patch_lang = patch_once_per_launch
    interpreter.GridExecutor.__call__ = launch
    _STATE["plain"] = (patch_lang, run_grid, options)
    return True


def uninstall() -> None:
    """Put the interpreter back as Triton made it."""
    if not installed():
        return
    interpreter = _interpreter()
    patch_lang, run_grid, options = _STATE.pop("plain")
    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang, run_grid
    interpreter.interpreter_builder.options = options


def installed() -> bool:
    return "plain" in _STATE


@contextlib.contextmanager
def plain():
    """The plain interpreter while active; the faster one again afterwards, if it was on."""
    was_installed = installed()
    uninstall()
    try:
        yield
    finally:
        if was_installed:
            install()
