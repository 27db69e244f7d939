"""The C++ control plane (runtime/csrc/) as `tscompile.runtime._scheduler`; everything else
is configured in pyproject.toml."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

setup(
    ext_modules=[Pybind11Extension(
        "tscompile.runtime._scheduler",
        ["runtime/csrc/block_pool.cpp", "runtime/csrc/scheduler.cpp",
         "runtime/csrc/bindings.cpp"],
        include_dirs=["runtime/csrc"], cxx_std=17, extra_compile_args=["-O2"])],
    cmdclass={"build_ext": build_ext},
)
