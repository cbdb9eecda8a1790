"""Layers run one way: decode imports neither train nor lightning; the packages are this repo's."""
import subprocess
import sys

from tests.conftest import REPO


def test_decode_imports_without_lightning_or_train():
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None; "
            "sys.modules['train'] = None; import decode.engine, decode.pipeline, decode.target, decode.vq, "
            "decode.text, decode.checkpoint, decode.drafter, decode.evaluator, decode.quality, decode.resolvers, "
            "decode.drafting, decode.acceptance, decode.trees, decode.skipping, decode.jacobi, decode.methods, "
            "decode.__main__")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_packages_come_from_this_repository():
    import data
    import decode
    import train

    for pkg in (data, decode, train):
        assert REPO in __import__("pathlib").Path(pkg.__file__).resolve().parents, pkg.__file__


def test_data_does_not_import_train():
    code = ("import sys; sys.modules['train'] = None; sys.modules['lightning'] = None; "
            "import data.world, data.shards, data.sources, data.images, data.preprocess")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
