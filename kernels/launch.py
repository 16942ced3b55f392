"""Launching a compiled kernel without ``JITFunction.run`` on every call.

``kernel[grid](*args)`` binds every argument, computes Triton's specialisation key, reads its
knobs and checks the kernel's globals before it launches: 60-75 us of host time per launch on an
H200's host, more than the kernels take at small sizes. ``launch`` keeps the compiled kernel
of each specialisation itself, keyed by what Triton specialises a launch on (each tensor's dtype
and 16-byte alignment, each int's width and, unless the kernel says not to, whether it is 1 or a
multiple of 16, the compile-time constants and launch options, the device), and calls the
compiled kernel's launcher directly. The first launch of a key goes through ``kernel[grid]``
(which compiles); so does every launch under the interpreter, with a launch hook set (a
profiler's), or of anything that is not a JIT function (bench/kernel_report.py's recorders).
"""

import triton
from triton.runtime.jit import JITFunction

try:  # Triton >= 3.4
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover
    _knobs = None

_CACHES = {}  # JITFunction -> {key: compiled kernel}


def _spec(param, value):
    """What Triton's launch specialises on for one runtime argument."""
    if hasattr(value, "data_ptr"):  # a tensor: its dtype and 16-byte alignment
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        width = "i32" if -2**31 <= value < 2**31 else "i64" if value < 2**63 else "u64"
        if param.do_not_specialize:
            return width
        aligned = None if param.do_not_specialize_on_alignment else value % 16 == 0
        return width, value == 1, aligned
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return None
    raise TypeError(f"launch: cannot key argument {param.name}={value!r}")


def specialise(fn, args, kwargs):
    """(every parameter's value in the kernel's order, the launch's specialisation: the launch
    options, the compile-time constants and what Triton keys each runtime argument on)."""
    params = fn.params
    values = list(args) + [kwargs[p.name] for p in params[len(args):]]
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in fn.arg_names))
    return values, (options, tuple(v if p.is_constexpr else _spec(p, v)
                                   for p, v in zip(params, values)))


def _hooked():
    """Whether a launch hook is set (Triton's chains of them, or a plain hook)."""
    if _knobs is None:
        return True
    hooks = (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def launch(fn, grid, *args, **kwargs):
    """``fn[grid](*args, **kwargs)``: positional runtime arguments in the kernel's order, the
    compile-time constants and launch options by keyword (as the kernels here are called)."""
    if not isinstance(fn, JITFunction) or _hooked():
        return fn[grid](*args, **kwargs)
    values, specialisation = specialise(fn, args, kwargs)
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    key = (device, specialisation)
    cache = _CACHES.setdefault(fn, {})
    kernel = cache.get(key)
    if kernel is None:
        cache[key] = fn[grid](*args, **kwargs)
        return cache[key]
    grid = tuple(grid) + (1, 1)
    # No launch metadata and no hooks: none is set (_hooked).
    kernel.run(grid[0], grid[1], grid[2], driver.get_current_stream(device), kernel.function,
               kernel.packed_metadata, None, None, None, *values)
    return kernel
