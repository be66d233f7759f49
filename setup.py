"""The one compiled part of datamill: ZIP-FIT's DEFLATE size kernel (selection/_deflate_size.c).

`optional=True`: if the compiler fails, the install still succeeds and ZIP-FIT falls back to
zlib (same scores, about 3x slower) with a warning. Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("selection._deflate_size", ["selection/_deflate_size.c"],
                             extra_compile_args=["-O3"], libraries=["m"], optional=True)])
