"""The compatibility matrix: every adapter file kind the project writes × the readers' own loading code.

    python compat/matrix.py [--comfyui DIR] [--a1111 DIR] [--forge DIR] [--arch sd15 sdxl] [--work DIR]

DIR is a reader's source tree (not installed, not vendored: see compat/README.md for the pinned commits and the
extra packages their imports need). Rows of readers whose source is not given are skipped with a note. Each cell
is the max over adapted layers of ‖W_reader − W'‖_F / ‖W'‖_F, W' being the file's merged weight (compat/cases.py),
for SD1.x / SDXL. A cell is marked ✓ when ``adapters.readers.exact_readers`` claims the reader applies that file
exactly; the run fails (exit 1) if a claimed cell is above 1e-3 or a reader the file's header names is not
claimed. Files derived from the DoRA (SVD LoRA, conversion) also get their own distance to the DoRA's W'.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from compat.cases import ARCHS, Case, make_cases  # noqa: E402
from compat.libraries import LIBRARIES, NotApplicable  # noqa: E402
from dreambooth_dora.adapters.readers import READERS, exact_readers  # noqa: E402

EXACT = 1e-3


def relative_error(got: dict, truth: dict) -> float:
    return max(float((got[k].float() - t).norm() / t.norm()) for k, t in truth.items())


def measure(case: Case, read) -> tuple[float | None, str]:
    """(max relative error, note) of one reader on one case; None with the reason when it did not load."""
    try:
        got = read(case, sorted(case.truth))
    except NotApplicable:
        return None, "n/a"
    except Exception as e:  # the reader's own failure is a result of the matrix
        line = " ".join(str(e).split())[:110] or type(e).__name__
        return None, f"fails: {type(e).__name__}: {line}"
    return relative_error(got, case.truth), ""


def cell(case: Case, reader: str, err: float | None, note: str) -> tuple[str, bool]:
    """Table text and whether the cell contradicts the project's claim."""
    claimed = reader in exact_readers(case.form)
    if err is None:
        return (f"✗ CLAIMED, {note}" if claimed else note), claimed
    text = f"{err:.1e}"
    if claimed:
        return (f"✓ {text}" if err <= EXACT else f"✗ CLAIMED {text}"), err > EXACT
    return text, False


def run(readers: dict, archs: list[str], work: Path, out=print) -> int:
    """Print the table; returns the number of contradicted claims."""
    bad = 0
    results: dict[str, dict[str, list[str]]] = {}
    derived: dict[str, list[str]] = {}
    for arch in archs:
        for case in make_cases(arch, work / arch):
            if sorted(case.labels) != sorted(exact_readers(case.form)):
                out(f"HEADER MISMATCH {case.name} ({arch}): exact_in {case.labels}")
                bad += 1
            if case.source_truth is not None:
                derived.setdefault(case.name, []).append(f"{relative_error(case.truth, case.source_truth):.1e}")
            for reader, read in readers.items():
                err, note = measure(case, read)
                text, wrong = cell(case, reader, err, note)
                bad += wrong
                results.setdefault(case.name, {}).setdefault(reader, []).append(text)
    files = list(results)
    out("| reader | " + " | ".join(files) + " |")
    out("|---|" + "---|" * len(files))
    for reader in readers:
        out(f"| {reader} | " + " | ".join(" / ".join(results[f][reader]) for f in files) + " |")
    out(f"\ncells: {' / '.join(archs)}; ✓ = claimed exact (adapters.readers) and measured ≤ {EXACT:g}")
    for name, errs in derived.items():
        out(f"{name}: the file's own W' vs the trained DoRA's W': {' / '.join(errs)} (the route's cost)")
    return bad


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", type=Path, help="ComfyUI source tree (upstream commit 94c298f9)")
    p.add_argument("--a1111", type=Path, help="stable-diffusion-webui source tree (v1.10.1, 82a973c0)")
    p.add_argument("--forge", type=Path, help="stable-diffusion-webui-forge source tree (dfdcbab6)")
    p.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    p.add_argument("--work", type=Path, help="folder for the files (default: a temporary one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    readers = dict(LIBRARIES)
    for name in ("comfyui", "a1111", "forge"):
        source = getattr(args, name)
        if source is None:
            print(f"note: no --{name} source given: its row is skipped")
            continue
        from compat import uis

        readers[name] = uis.reader(name, source)
    readers = {r: readers[r] for r in READERS if r in readers}
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            bad = run(readers, args.arch, args.work or Path(tmp))
        except Exception:
            traceback.print_exc()
            return 2
    if bad:
        print(f"\n{bad} claim(s) contradicted by the measurement")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
