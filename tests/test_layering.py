"""Layers run one way: decode imports neither train nor lightning; the packages are this repo's."""
import subprocess
import sys

from tests.conftest import REPO


def test_decode_imports_without_lightning_or_train():
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None; "
            "sys.modules['train'] = None; import decode.core.engine, decode.pipeline, decode.models.target, decode.models.vq, "
            "decode.models.text, decode.models.checkpoint, decode.models.drafter, decode.evaluation.world_evaluator, decode.evaluation.quality, decode.resolvers, "
            "decode.strategies.drafting, decode.strategies.acceptance, decode.core.trees, decode.strategies.skipping, decode.strategies.jacobi, decode.strategies.registry, "
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
