"""The most a wavefront of grid rows can give on a grid: target passes when every guess is accepted.

The next-set schedule (decode/core/wavefront.py) with rows verifying chains (decode/core/lanes.py) is
simulated without a model: each pass, every row in flight feeds its newest token and a chain of
`lane_drafts` guesses cut by the schedule (its own row, ZipAR's window to the row above), and every
guess is taken as accepted. That is the cap of method=spatial and method=zipar_sjd for each setting:
real heads accept fewer. Writes a markdown table (and prints it).

python scripts/wavefront_cap.py --width 16 --out docs/results/spatial/cap.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from decode.core.lanes import _room  # noqa: E402
from decode.core.wavefront import NextSet, _plan  # noqa: E402


def passes_when_all_accepted(width: int, height: int, schedule: NextSet, seed_rows: bool = False) -> int:
    """`seed_rows`: a new row's stand-in verifies guesses too (spatial's below head); its accepted tokens
    are fed by the row's next pass, as decode/core/lanes.py does."""
    schedule.check(width, height)
    count, fed, n = [1] + [0] * (height - 1), [0] * height, 0
    while sum(count) < width * height:
        avail = list(count)
        for lane in _plan(count, fed, width, 0, schedule):
            in_row = (lane.keep or seed_rows) and lane.predicts is not None and lane.predicts // width == lane.row
            took = 1 + (_room(avail, lane.row, lane.predicts, width, schedule) if in_row else 0)
            if lane.keep:  # its unfed tokens, the newest and the accepted guesses
                fed[lane.row] = count[lane.row] - 1 + took if lane.predicts is not None and \
                    lane.predicts // width == lane.row else count[lane.row]
            if lane.predicts is not None:
                count[lane.predicts // width] += took
        n += 1
    return n


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="grid width = height (the world's: 16)")
    parser.add_argument("--windows", default="1,2,3,4,6,8,16")
    parser.add_argument("--drafts", default="0,1,2,4,8,15")
    parser.add_argument("--rows", default="4,16", help="max_rows values")
    parser.add_argument("--out", default=None, help="write the table here (markdown)")
    args = parser.parse_args(argv)
    w = args.width
    windows = [int(x) for x in args.windows.split(",")]
    rows = [int(x) for x in args.rows.split(",")]
    lines = [f"Step compression when every guess is accepted, {w} x {w} grid ({w * w} tokens; passes after the "
             f"prefill in brackets). Rows: lane_drafts (guesses per row per pass); columns: row_window, max_rows."]
    for title, seed_rows in (("zipar_sjd (new rows start from ZipAR's stand-in alone)", False),
                             ("spatial (the below head's guesses for a new row verified beside its stand-in)", True)):
        lines += ["", f"**{title}**", "",
                  "| lane_drafts | " + " | ".join(f"w{win} r{r}" for win in windows for r in rows) + " |",
                  "|---" * (1 + len(windows) * len(rows)) + "|"]
        for d in (int(x) for x in args.drafts.split(",")):
            cells = []
            for win in windows:
                for r in rows:
                    n = passes_when_all_accepted(w, w, NextSet(min(win, w), min(r, w), min(d, w - 1)), seed_rows)
                    cells.append(f"{w * w / n:.2f} ({n})")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
