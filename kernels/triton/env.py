"""What the Triton modules call first: `interpreting()` says whether Triton runs in its CPU interpreter
and, if so, fixes that interpreter (each module that needs the fix calls it at import, so it applies
whichever module comes first)."""
import os


def interpreting() -> bool:
    on = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if on:
        _interpreter_loop_bounds_fix()
    return on


def _interpreter_loop_bounds_fix() -> None:
    """Triton 3.6's interpreter holds every scalar as a 1-element numpy array and turns it into a loop
    bound with int(array), which numpy >= 2.4 refuses for arrays of dimension 1: loops with a runtime
    bound (`for i in range(0, n)`, the GPU-friendly form) fail there. Read the one element instead."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_loop_bounds_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._loop_bounds_fix = True
    interpreter._patch_lang_tensor = patched
