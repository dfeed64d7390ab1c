"""The type stubs of the compiled modules (fastopt/_cpu.pyi, fastopt/_cuda.pyi) against the
modules themselves: they ship next to them, name exactly what each module defines, and give
each function the parameters (names, order, defaults) of its pybind11 signature."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from fastopt import _ext


def public(names: Any) -> set:
    """Names other than dunders and pybind11's own per-class hook."""
    return {n for n in names if not n.startswith("__") and not n.startswith("_pybind11_")}


def defined(body: List[ast.stmt]) -> Dict[str, ast.stmt]:
    """The names a stub body defines (imports excluded)."""
    names: Dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, ast.Assign):
            names.update((t.id, node) for t in node.targets if isinstance(t, ast.Name))
    return names


def parameters(fn: ast.FunctionDef) -> List[Tuple[str, str]]:
    """(name, default as source or '') of every parameter, *args and **kwargs included."""
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [""] * (len(positional) - len(a.defaults)) + [ast.unparse(d) for d in a.defaults]
    params = [(p.arg, d) for p, d in zip(positional, defaults)]
    if a.vararg:
        params.append(("*" + a.vararg.arg, ""))
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        params.append((p.arg, "" if d is None else ast.unparse(d)))
    if a.kwarg:
        params.append(("**" + a.kwarg.arg, ""))
    return params


def binding_signature(obj: Any) -> ast.FunctionDef:
    """The signature pybind11 writes as the first line of a function's __doc__, parsed."""
    line = (obj.__doc__ or "").splitlines()[0]
    tree = ast.parse(f"def {line}: ...")
    fn = tree.body[0]
    assert isinstance(fn, ast.FunctionDef)
    return fn


@pytest.fixture(params=["_cpu", "_cuda"])
def module_and_stub(request: Any) -> Tuple[Any, Dict[str, ast.stmt]]:
    module = getattr(_ext, request.param)
    if module is None:
        pytest.skip(f"fastopt.{request.param} is not built: {_ext.cuda_unavailable_reason()}")
    stub = Path(module.__file__).parent / f"{request.param}.pyi"
    assert stub.is_file(), f"{stub} is not installed next to the module"
    return module, defined(ast.parse(stub.read_text()).body)


def test_stub_names_equal_module_names(module_and_stub: Any) -> None:
    # the optimizers' generated step functions are typed by the stub's __getattr__
    module, stub = module_and_stub
    steps = set(module.optimizers())
    assert "__getattr__" in stub
    assert set(stub) - {"__getattr__"} == public(dir(module)) - steps
    for name in steps:  # each takes (role lists..., listed, **keywords)
        assert parameters(binding_signature(getattr(module, name))) == [
            ("*args", ""), ("**kwargs", "")], name


def test_stub_functions_match_binding_signatures(module_and_stub: Any) -> None:
    module, stub = module_and_stub
    checked = 0
    for name, node in stub.items():
        if isinstance(node, ast.FunctionDef) and name != "__getattr__":
            binding = binding_signature(getattr(module, name))
            assert binding.name == name
            assert parameters(node) == parameters(binding), name
            checked += 1
    assert checked >= 13  # the kernels, optimizers() and the settings


def test_stub_classes_match_binding_classes(module_and_stub: Any) -> None:
    module, stub = module_and_stub
    for name, node in stub.items():
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(module, name)
        members = defined(node.body)
        assert set(members) - {"__init__"} == public(vars(cls)), name
        for member, member_node in members.items():
            assert isinstance(member_node, ast.FunctionDef), (name, member)
            is_property = any(
                isinstance(d, ast.Name) and d.id == "property" for d in member_node.decorator_list
            )
            assert is_property == isinstance(vars(cls)[member], property), (name, member)
            if not is_property:  # pybind11 names the bound instance `self` too
                binding = binding_signature(getattr(cls, member))
                assert parameters(member_node) == parameters(binding), (name, member)
