"""Layers run one way: decode imports neither train nor lightning; the packages are this repo's."""
import subprocess
import sys

from tests.conftest import REPO


def _modules(package: str) -> list[str]:
    """Every module of a package of this repository, found on disk (a new module is covered at once)."""
    root = REPO / package
    return sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for p in root.rglob("*.py"))


def test_decode_imports_without_lightning_or_train_or_data():
    modules = _modules("decode")
    assert "decode.core.engine" in modules and "decode.strategies.registry" in modules and len(modules) > 25
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None; "
            "sys.modules['train'] = None; sys.modules['data'] = None; import " + ", ".join(modules))
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_module_names_are_not_used_twice_across_packages():
    names = {}
    for package in ("decode", "train", "data"):
        for module in _modules(package):
            leaf = module.split(".")[-1]
            if leaf not in ("__init__", "__main__", package):
                names.setdefault(leaf, []).append(module)
    assert {k: v for k, v in names.items() if len(v) > 1} == {}


def test_packages_come_from_this_repository():
    import data
    import decode
    import train

    for pkg in (data, decode, train):
        assert REPO in __import__("pathlib").Path(pkg.__file__).resolve().parents, pkg.__file__


def test_data_does_not_import_train():
    code = ("import sys; sys.modules['train'] = None; sys.modules['lightning'] = None; "
            "import " + ", ".join(_modules("data")))
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
