"""``lowra_kernels``: the import name of the repository's ``kernels/`` folder, for runs from a checkout.

Why a second name: Hugging Face's ``kernels`` distribution (``pip install kernels``; used by
bitsandbytes and transformers) owns the top-level import name ``kernels``. A project package of
that name shadows it, or is shadowed by it, depending on ``sys.path`` order. So the folder keeps
its place in the layout but has no ``__init__.py`` and is imported as ``lowra_kernels``:

* installed (``pip install -e .`` as ``make venv`` and CI do, or a wheel): setup.cfg maps the
  package ``lowra_kernels`` to the folder (``package_dir``); it is a PEP 420 namespace package
  whose ``__path__`` is ``[<repo>/kernels]`` (editable) or ``site-packages/lowra_kernels`` (wheel);
* from the repository root without an install (the GPU image, ``make gpu-check``): the current
  directory is first on ``sys.path`` and this module is found; setting ``__path__`` makes it a
  package whose submodules (``lowra_kernels.lut_matmul``, ...) load from ``kernels/``. It is also
  found first from the root of an installed checkout, where it points at the same folder.

Seen from the root, ``kernels/`` without ``__init__.py`` is at most a namespace-package portion of
``kernels``, which the import system ranks below a regular package: HF's ``kernels`` wins when it
is installed. Nothing here imports torch or triton; the submodules do, when imported.
"""

import os

__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")]
if __spec__ is not None:  # so that importlib (find_spec, resources) sees a package too
    __spec__.submodule_search_locations = __path__
