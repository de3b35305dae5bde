"""Getting the GPU side ready while the first chunks load.

Where a viewer's start-up went (profiled on lavapipe and 2 cores): not shader
compilation, as it looked, but Python. wgpu-py talks to wgpu-native through cffi in
ABI mode, and cffi parses each C type string (``"WGPUTextureDescriptor *"``) the first
time it is used, with every typedef of wgpu's header (~450) prepended to it: some 70
type strings, about 45 ms each, for creating the device and drawing a first frame
with one image: about 3 s, holding the GIL. (wgpu-py's issue #789 is about start-up
time.) So:

* :func:`warm_wgpu_types` parses all the type strings wgpu-py's backend names in ONE
  pass (the same parse and the same cffi calls as cffi's own ``typeof``, so the types
  are the ones cffi would make): ~0.1 s instead of ~3 s.
* :func:`cached_c_parses` keeps what pycparser makes of those C sources (wgpu's
  header, the callback signature its import declares, the warm-up's one declaration)
  in a directory of the user's cache, so that a new process loads the syntax trees
  (pickled, ~20 ms) instead of parsing again (~0.2 s of Python, on 2 cores while the
  viewer's first requests travel, and the GIL held throughout).
* :class:`GpuStart` does that and creates pygfx's shared device (adapter + device) in a
  thread, so the viewer meanwhile opens the image and asks for its first chunks (the
  native calls release the GIL); meanwhile the interpreter switches threads every
  0.5 ms, not 5 (:func:`short_switch_interval`), so that zarr's event loop, waking up
  for each response, is not held up by that thread's Python.
* :func:`cache_shader_templates` keeps pygfx's shader templates, compiled (jinja2
  parses and compiles each WGSL snippet into Python code: most of the time it takes to
  build a render pipeline, all of it holding the GIL), in a directory of the user's cache,
  so that a new process loads them instead (as Mesa keeps its compiled shaders).
* :func:`warm_pipelines` renders placeholder tiles with every material the layers
  will use, and flushes that into a texture of the canvas's format and size (nothing
  is presented), so the render pipelines exist before the first data arrives: the frame
  that shows data compiles none.

Each is an optimisation only: if cffi or wgpu-py change their internals, the warm-up
parses nothing (logged at debug level) and start-up is as slow as before, not broken.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pygfx as gfx
import wgpu

__all__ = [
    "DEVICE_TIMEOUT",
    "GpuStart",
    "c_parse_cache_dir",
    "cache_shader_templates",
    "cached_c_parses",
    "shader_cache_dir",
    "short_switch_interval",
    "warm_pipelines",
    "warm_wgpu_types",
]

logger = logging.getLogger("zarrscope")

#: How long the viewer waits at most for the GPU device started in the background.
DEVICE_TIMEOUT = 120.0

#: String literals in wgpu-py's backend that are C types: pointers and arrays
#: (``"WGPUColor *"``, ``"char []"``), callback signatures (``"void(...)"``), and bare
#: names (``new_struct("WGPUColor", ...)`` makes a ``"WGPUColor *"``; ``ffi.cast``).
_C_TYPE_LITERAL = re.compile(
    r'"([A-Za-z_][\w ]*(?:\*|\[\d*\])[ *\[\]\d]*|void ?\([\w ,*]*\)|[A-Za-z_]\w*)"'
)
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_C_WORDS = frozenset(
    {"void", "char", "short", "int", "long", "float", "double", "signed", "unsigned"}
    | {"const", "volatile", "bool"}
)


def _wgpu_ffi() -> Any:
    from wgpu.backends.wgpu_native._ffi import ffi

    return ffi


def wgpu_type_strings() -> list[str]:
    """The C type strings wgpu-py's native backend uses (from its source): every one
    whose names the cffi declarations know."""
    import wgpu.backends.wgpu_native as backend
    from cffi.commontypes import COMMON_TYPES

    ffi = _wgpu_ffi()
    declared = ffi._parser._declarations
    found: set[str] = set()
    for path in Path(backend.__file__).parent.glob("*.py"):
        for match in _C_TYPE_LITERAL.finditer(path.read_text(encoding="utf-8")):
            text = match.group(1)
            if not _IDENTIFIER.fullmatch(text):
                found.add(text)
            elif f"typedef {text}" in declared:  # new_struct("WGPUColor") or a cast
                found.update((text, text + " *"))
            elif text in COMMON_TYPES:  # ffi.cast("intptr_t", ...)
                found.add(text)

    def known(name: str) -> bool:
        return name in _C_WORDS or name in COMMON_TYPES or f"typedef {name}" in declared

    return sorted(t for t in found if all(known(n) for n in _IDENTIFIER.findall(t)))


def warm_wgpu_types() -> int:
    """Parse, in one pass, every C type string wgpu-py uses that cffi has not parsed
    yet, and put them in cffi's cache of parsed types; how many. Thread-safe (cffi's
    lock); 0 (and a debug line) if cffi's or wgpu-py's internals are not as expected."""
    try:
        ffi = _wgpu_ffi()
        parser = ffi._parser
        todo = [t for t in wgpu_type_strings() if t not in ffi._parsed_types]
        if not todo:
            return 0
        # what cffi's parse_type does for one type, for all of them as the
        # parameters of one declaration
        params_text = ",\n".join(todo)
        ast = parser._parse(f"void __dummy(\n{params_text}\n);")[0]
        params = ast.ext[-1].type.args.params
        if len(params) != len(todo):
            raise ValueError(f"{len(params)} parameters parsed for {len(todo)} types")
        with ffi._lock:
            for text, node in zip(todo, params, strict=True):
                if text in ffi._parsed_types:
                    continue
                ctype = parser._get_type_and_quals(node.type)[0]
                is_function = ctype.is_raw_function
                if is_function:
                    ctype = ctype.as_function_pointer()
                ffi._parsed_types[text] = (ffi._get_cached_btype(ctype), is_function)
        return len(todo)
    except Exception as err:  # an optimisation only: never fail start-up for it
        logger.debug("wgpu type warm-up skipped: %s: %s", type(err).__name__, err)
        return 0


def _user_cache() -> Path:
    """``$XDG_CACHE_HOME/zarrscope`` (``~/.cache/zarrscope`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zarrscope"


def c_parse_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/zarrscope/cparse`` (``~/.cache/...`` by default), where
    :func:`cached_c_parses` keeps its syntax trees."""
    return _user_cache() / "cparse"


_parse_patch = threading.Lock()  # one patched window at a time (imports are serial anyway)


@contextlib.contextmanager
def cached_c_parses(directory: Path | None = None) -> Iterator[Path | None]:
    """While in the block, what cffi's parser makes of a C source with pycparser (its
    ``Parser._parse``: the syntax tree, the macros) is loaded from ``directory``
    (default :func:`c_parse_cache_dir`) if kept there, else made and kept there.

    The key is everything that parse reads: the source, the typedef names the
    parser knows already (they change how the source parses), and the cffi and
    pycparser versions; so a tree loaded is the one the parse would make, and
    nothing else of cffi changes (the declarations are built from the tree as
    always). Files are written whole (a temporary file renamed). Yields the
    directory, or None (nothing cached: cffi's internals are not as expected, or the
    directory cannot be made; logged at debug level): an optimisation only."""
    with _parse_patch:
        try:
            import cffi
            import pycparser
            from cffi.cparser import Parser

            original = Parser._parse
            directory = c_parse_cache_dir() if directory is None else directory
            directory.mkdir(parents=True, exist_ok=True)
        except Exception as err:
            logger.debug("C parse cache skipped: %s: %s", type(err).__name__, err)
            yield None
            return
        versions = f"cffi {cffi.__version__} pycparser {pycparser.__version__}\n"

        def parse(parser: Any, csource: str) -> Any:
            known = sorted(n for n in parser._declarations if n.startswith("typedef "))
            digest = hashlib.sha256()
            for part in (versions, csource, "\n".join(known)):
                digest.update(part.encode())
                digest.update(b"\0")
            path = directory / f"{digest.hexdigest()}.pickle"
            try:
                with path.open("rb") as file:
                    return pickle.load(file)
            except FileNotFoundError:
                pass
            except Exception as err:  # unreadable: parse, and write it again
                logger.debug("C parse cache entry %s skipped: %s", path.name, err)
            result = original(parser, csource)
            _keep(path, result)
            return result

        Parser._parse = parse
        try:
            yield directory
        finally:
            Parser._parse = original


def _keep(path: Path, value: object) -> None:
    """Pickle ``value`` to ``path``, whole or not at all (a temporary file renamed)."""
    temporary = None
    try:
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False) as file:
            temporary = file.name
            pickle.dump(value, file, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(temporary, path)
    except Exception as err:  # an optimisation only
        logger.debug("C parse cache entry %s not kept: %s", path.name, err)
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def shader_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/zarrscope/shaders/pygfx-V-jinja2-V`` (``~/.cache/...`` by
    default): one directory per pygfx and jinja2 version (jinja2's cache keys are the
    template names and sources, not what the environment compiling them is set to)."""
    import jinja2

    return _user_cache() / "shaders" / f"pygfx-{gfx.__version__}-jinja2-{jinja2.__version__}"


def cache_shader_templates(directory: Path | None = None) -> Path | None:
    """Make pygfx's shader templates load from (and be stored in) ``directory``
    (default :func:`shader_cache_dir`) compiled, unless pygfx's template environment
    has a bytecode cache already; the directory, or None if there is none (it cannot
    be made, or pygfx's internals are not as expected: logged at debug level)."""
    try:
        import jinja2
        from pygfx.renderers.wgpu.shader.templating import jinja_env

        if jinja_env.bytecode_cache is not None:
            return None
        directory = shader_cache_dir() if directory is None else directory
        directory.mkdir(parents=True, exist_ok=True)
        jinja_env.bytecode_cache = jinja2.FileSystemBytecodeCache(str(directory))
        return directory
    except Exception as err:  # an optimisation only
        logger.debug("shader template cache skipped: %s: %s", type(err).__name__, err)
        return None


#: The interpreter's switch interval while a :class:`GpuStart` thread runs (seconds).
STARTUP_SWITCH_INTERVAL = 0.0005

_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


@contextlib.contextmanager
def short_switch_interval(interval: float = STARTUP_SWITCH_INTERVAL) -> Iterator[None]:
    """Within the block (in any thread; nested or concurrent blocks share one), the
    interpreter hands the GIL to a waiting thread after ``interval`` s, not Python's
    default 5 ms; the interval before is restored when the last block ends.

    Why: the GPU start-up thread runs ~0.2 s of Python (wgpu's import, cffi's types)
    while the viewer's first requests travel, on zarr's event loop. Each time that loop
    wakes up (a response, a send) it waits for the GIL; with the default interval that
    is up to 5 ms per wake-up, dozens of them per round trip: measured over HTTP with
    50 ms latency on the sample, opening took ~0.29 s with the GPU thread busy against
    ~0.12 s without."""
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, _switch_saved))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


class GpuStart:
    """pygfx's shared GPU device, created in a thread started here (after
    :func:`warm_wgpu_types`), so that the caller opens its data meanwhile; and the
    shader templates cached on disk (:func:`cache_shader_templates`).

    :meth:`wait` returns once the device exists (re-raising what creating it raised).
    :attr:`seconds` records how long each step took (``types``, ``device``)."""

    def __init__(self) -> None:
        cache_shader_templates()
        self.seconds: dict[str, float] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="zarrscope-gpu-start", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from pygfx.renderers.wgpu import get_shared

        try:
            with short_switch_interval():
                started = time.perf_counter()
                with cached_c_parses():  # wgpu's header, and the types warmed
                    warm_wgpu_types()
                ready = time.perf_counter()
                self.seconds["types"] = ready - started
                get_shared().device  # noqa: B018 (adapter + device, on first use)
                self.seconds["device"] = time.perf_counter() - ready
        except BaseException as err:  # re-raised by wait(), in the caller's thread
            self._error = err

    def wait(self, timeout: float = DEVICE_TIMEOUT) -> None:
        """Block until the device exists (at most ``timeout`` s: then TimeoutError)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the GPU device was not ready after {timeout:.0f} s")
        if self._error is not None:
            raise self._error


def warm_pipelines(
    renderer: gfx.WgpuRenderer, wobjects: Iterable[gfx.WorldObject], scene: gfx.Scene | None = None
) -> None:
    """Compile the render pipelines of ``wobjects`` (placeholder objects with the
    materials and texture formats the frames will use) and of ``scene``'s background,
    by rendering them into the renderer's internal target, not presented: pygfx caches
    pipelines by what they are made of, so the real objects reuse them. That target is
    then marked to be cleared (colour, depth, weights) by the next frame's first pass,
    so nothing of the placeholders shows."""
    warm = gfx.Scene()
    if scene is not None:
        for child in scene.children:
            if isinstance(child, gfx.Background):
                warm.add(gfx.Background(None, child.material))
    for wobject in wobjects:
        warm.add(wobject)
    camera = gfx.OrthographicCamera(4, 4)
    renderer.render(warm, camera, flush=False)
    _warm_flush(renderer)
    renderer.clear(all=True)


def _warm_flush(renderer: gfx.WgpuRenderer) -> None:
    """Compile the pass that copies a frame to the canvas, by flushing once into a
    texture of the canvas's format and size (nothing is presented)."""
    try:
        context = getattr(renderer, "_canvas_context", None)  # none: into a texture
        if context is None:
            return
        fmt = context.get_preferred_format(renderer._shared.adapter)  # as pygfx picks it
        # the size too: the copy's shader differs when it scales
        width, height = renderer.target.get_physical_size()
        size = (max(1, int(width)), max(1, int(height)), 1)
        target = gfx.Texture(dim=2, size=size, format=fmt, colorspace="physical")
        target._wgpu_usage |= wgpu.TextureUsage.RENDER_ATTACHMENT  # as pygfx does for one
        renderer.flush(target)
    except Exception as err:  # an optimisation only
        logger.debug("flush warm-up skipped: %s: %s", type(err).__name__, err)
