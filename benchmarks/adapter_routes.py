"""Routes for a DoRA whose axis its destination does not read: how close does each come to the trained W'?

    python benchmarks/adapter_routes.py --base builtin:toy --adapter RUN/adapter.safetensors [--adapter ...]
        [--ranks 1 2 4]          # multiples of each adapter's own rank

For every adapted layer of every adapter, W' (the trained merged weight, fp32) is approximated by
  svd-lora r   the best rank-r plain LoRA of W' − W0 (truncated SVD; what ``export svd`` writes),
  dora-fit r   a DoRA of the other axis, rank r, fitted to W' (``tools.convert.fit_dora``; what ``convert``
               writes for a destination that reads only that axis),
and the table gives the relative error ‖W_route − W'‖_F / ‖W' − W0‖_F (how much of the learned update is lost):
the worst layer and pooled over all layers (mean ± std over adapters), plus the same pooled error relative to
‖W'‖ (the weight error the compatibility matrix measures) and the file size of each route. A full-rank LoRA and
the merged checkpoint are exact (error 0); their sizes are listed for comparison.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from dreambooth_dora.adapters.inject import components  # noqa: E402
from dreambooth_dora.adapters.io import read_adapter_file  # noqa: E402
from dreambooth_dora.sd.pipelines import load_pipeline  # noqa: E402
from dreambooth_dora.tools.convert import _merged_delta, fit_dora  # noqa: E402
from dreambooth_dora.tools.export import svd_factors  # noqa: E402

BYTES = 2  # fp16, the size files ship in


def measure(pipe, path: Path, ranks: list[int]) -> dict[str, dict[str, float]]:
    """{route: {"max": worst layer error, "pooled": pooled update error, "weight": pooled weight error,
    "mb": file size}} for one adapter."""
    parsed = read_adapter_file(path, pipe)
    comps = components(pipe)
    sums: dict[str, list[float]] = {}
    worst: dict[str, float] = {}
    sizes: dict[str, float] = {}
    full_params = merged_params = 0
    for (comp, mod), lt in parsed.layers.items():
        w0 = comps[comp].get_submodule(mod).weight.detach().float()
        delta = _merged_delta(w0, lt)
        target = w0 + delta
        r0 = int(lt.A.shape[0])
        other = "in" if lt.axis == "out" else "out"
        full_params += min(w0.shape) * sum(w0.shape)
        merged_params += w0.numel()
        for mult in ranks:
            r = r0 * mult
            b, a, err, _ = svd_factors(delta, r)
            fa, fb, _, ferr = fit_dora(w0, target, r, other)
            for route, e, params in (
                (f"svd-lora {r}", err, r * sum(w0.shape)),
                (f"dora-fit {r} (axis {other})", ferr, r * sum(w0.shape) + w0.shape[1 if other == "in" else 0]),
            ):
                acc = sums.setdefault(route, [0.0, 0.0, 0.0])
                acc[0] += e * e
                acc[1] += float(delta.norm()) ** 2
                acc[2] += float(target.norm()) ** 2
                norm = float(delta.norm())
                worst[route] = max(worst.get(route, 0.0), e / norm if norm else 0.0)
                sizes[route] = sizes.get(route, 0.0) + params * BYTES / 1e6
    out = {
        route: {
            "max": worst[route],
            "pooled": math.sqrt(e2 / d2),
            "weight": math.sqrt(e2 / w2),
            "mb": sizes[route],
        }
        for route, (e2, d2, w2) in sums.items()
    }
    out["full-rank lora (exact)"] = {"max": 0.0, "pooled": 0.0, "weight": 0.0, "mb": full_params * BYTES / 1e6}
    out["merged layers only (exact)"] = {"max": 0.0, "pooled": 0.0, "weight": 0.0, "mb": merged_params * BYTES / 1e6}
    return out


FIELDS = (("max", ".3f"), ("pooled", ".3f"), ("weight", ".2e"), ("mb", ".2f"))


def _cell(vals: list[float], fmt: str) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):{fmt}} ± {sd:{fmt}}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="builtin:toy")
    p.add_argument("--adapter", type=Path, action="append", required=True)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="multiples of each adapter's rank")
    args = p.parse_args()
    pipe = load_pipeline(args.base)
    results = [measure(pipe, path, args.ranks) for path in args.adapter]
    axes = {next(lt.axis for lt in read_adapter_file(a, pipe).layers.values()) for a in args.adapter}
    print(f"\n{len(results)} adapter(s) on {args.base}, trained axis {sorted(axes)}; mean ± std over adapters\n")
    print("| route | worst layer ‖ΔW_route − ΔW'‖/‖ΔW'‖ | pooled, same | pooled ‖W_route − W'‖/‖W'‖ | size MB (fp16) |")
    print("|---|---:|---:|---:|---:|")
    for route in results[0]:
        cells = [_cell([r[route][key] for r in results], fmt) for key, fmt in FIELDS]
        print(f"| {route} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
