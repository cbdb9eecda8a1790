"""Convert EAGLE drafters between LANTERN's published format and this project's (the two formats,
and what each cannot express about the other: decode/models/lantern_format.py).

python scripts/convert_drafter.py import LANTERN_FOLDER --target TARGET --out OUR_FOLDER
python scripts/convert_drafter.py export OUR_FOLDER --target TARGET --out LANTERN_FOLDER [--format bin]

TARGET is a project model folder or an official LlamaGen file (`--size XL`, geometry taken from the
drafter's config, `--set key=value` for any other GPTConfig field). Export needs the target too:
LANTERN's format carries the token embedding, copied from the target's `tok_embeddings`.

What the formats cannot say of each other (docs/algorithms.md 6; see `PREFIX_NOTE`):
- LANTERN feeds the embedding of token id 0 at the P-1 prefix slots; this project's drafters are
  trained with a zero embedding there unless `DrafterConfig.prefix_token` is 0. Import sets it to 0,
  so an imported drafter computes what LANTERN's does. Exporting a drafter trained with zeros: layer
  0 has no input norm, so LANTERN's prefix values differ by a constant Wv.fc_emb.E[0] and every image
  position's attention output moves by (its attention mass on the prefix) times that. Not
  representable in the weights; export warns (it can zero row 0 of the embedding with
  `--zero-token0-embedding`, exact at the prefix but then wrong wherever code 0 is an input).
- LANTERN's drafter may carry an embedding other than the target's `tok_embeddings` (its training
  code copies `lm_head.weight` when the HF target has no safetensors index). Import refuses that,
  naming which target matrix it matches, unless `--allow-embedding-mismatch`.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repository's packages

from decode.api import DTYPES
from decode.models.checkpoint import CheckpointError
from decode.models.lantern_format import (
    drafter_target_geometry,
    export_lantern,
    import_lantern,
    lantern_target_geometry,
    load_gpt,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("import", "LANTERN folder -> project folder"),
                       ("export", "project folder -> LANTERN folder")):
        s = sub.add_parser(name, help=what)
        s.add_argument("source")
        s.add_argument("--target", required=True, help="project target folder or official LlamaGen .pt")
        s.add_argument("--out", required=True)
        s.add_argument("--size", default="XL", help="LlamaGen size of an official target file")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="GPTConfig field of an official target file (repeatable)")
    imp, exp = sub.choices["import"], sub.choices["export"]
    imp.add_argument("--embed-rtol", type=float, default=1e-2,
                     help="max |E_drafter - E_target| / max |E_target| accepted (fp16/bf16 storage)")
    imp.add_argument("--allow-embedding-mismatch", action="store_true")
    exp.add_argument("--format", choices=("safetensors", "bin"), default="safetensors")
    exp.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 (the drafter is loaded in float32)")
    exp.add_argument("--zero-token0-embedding", action="store_true",
                     help="zero row 0 of the exported embedding: exact at the prefix slots, wrong for code 0")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "import":
            gpt = load_gpt(args.target, args.size, lantern_target_geometry(args.source), args.set)
            out = import_lantern(args.source, gpt, args.out, args.embed_rtol, args.allow_embedding_mismatch)
        else:
            gpt = load_gpt(args.target, args.size, drafter_target_geometry(args.source), args.set)
            out = export_lantern(args.source, gpt, args.out, args.format, args.dtype,
                                 args.zero_token0_embedding)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
