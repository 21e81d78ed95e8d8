"""Quality vs bits on the bundled demo VLM: every quantizer plain and with CASP at ~2, 2.25, 3 and 4 bits.

The demo-VLM half of the quality table (the SmolLM2 half is benchmarks/quality.py). Each level compares, at
about the same average bits per original parameter (every overhead counted):

    plain RTN / GPTQ        2.0: 2-bit per output channel; 2.25 / 3 / 4: 2 / 3 / 4-bit, group 128
    plain QuIP# (E8P)       2 / 2 / 3 / 4 bits (its codebook is fixed: ~2.1 / 3.1 / 4.1 bits with overheads)
    CASP + RTN / GPTQ       optimal allocation (2/3/4/8-bit candidates, 8 as in benchmarks/quality.py) at
                            2.0 (per-channel) / 2.25 / 3.25 / 4.25 bits (group 128)
    CASP + QuIP#            optimal allocation (2/3/4-bit candidates) at 2.0 / 2.25 / 3 / 4 bits

CASP keeps 50% of the Q/K parameters (see casp.demo.run.demo_methods for why not 25% here). AQLM is left out:
its codebooks alone cost 1-2 bits per weight on the demo's 256-wide layers. Each finished row is kept in
``<work>/rows.json`` and reused, so an interrupted run continues where it stopped.

    OMP_NUM_THREADS=1 python benchmarks/demo_levels.py --out benchmarks/results/demo_levels
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Run as a script, sys.path[0] is benchmarks/, whose kernels.py would shadow the `kernels` package that
# transformers probes: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from casp.compress import compress  # noqa: E402
from casp.config import CompressionConfig  # noqa: E402
from casp.demo.run import bundled_model_dir, make_data, score_model  # noqa: E402
from casp.formats.atomic import atomic_write_json  # noqa: E402

LEVELS = ("2", "2.25", "3", "4")


def level_methods(level: str, samples: int) -> dict[str, CompressionConfig]:
    """The methods compared at one level (see the module docstring), by row name."""
    common = dict(samples=samples, max_length=256)
    code_bits = {"2": 2, "2.25": 2, "3": 3, "4": 4}[level]
    group = 0 if level == "2" else 128  # 0: one scale/zero per output channel
    target = {"2": 2.0, "2.25": 2.25, "3": 3.25, "4": 4.25}[level]  # what plain RTN/GPTQ g128 cost
    casp = dict(method="casp", alloc="optimal", rank_ratio=0.5, **common)
    uniform_casp = dict(group_size=group, candidate_bits=(2, 3, 4, 8), **casp)
    return {
        "RTN": CompressionConfig(quantizer="rtn", bits=code_bits, group_size=group, **common),
        "GPTQ": CompressionConfig(quantizer="gptq", bits=code_bits, group_size=group, **common),
        "QuIP#": CompressionConfig(quantizer="quip", bits=code_bits, **common),
        "CASP+RTN": CompressionConfig(quantizer="rtn", bits=target, **uniform_casp),
        "CASP+GPTQ": CompressionConfig(quantizer="gptq", bits=target, **uniform_casp),
        "CASP+QuIP#": CompressionConfig(quantizer="quip", bits=float(level), candidate_bits=(2, 3, 4), **casp),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/demo_levels", help="writes OUT.md and OUT.json")
    p.add_argument("--work", default="/tmp/casp-demo-levels", help="models, data and finished rows")
    p.add_argument("--levels", default=",".join(LEVELS))
    p.add_argument("--test", type=int, default=300, help="held-out VQA questions (captions: a quarter of it)")
    p.add_argument("--calib", type=int, default=64, help="calibration conversations")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    levels = args.levels.split(",")
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown:
        p.error(f"unknown level(s) {unknown}; choose from {','.join(LEVELS)}")

    work = Path(args.work)
    data = make_data(work / "data", args.test, args.calib)
    tasks = [f"vqa:{data['vqa']}", f"caption:{data['caption']}"]
    rows_path = work / "rows.json"
    settings = {"test": args.test, "calib": args.calib}
    saved = json.loads(rows_path.read_text()) if rows_path.is_file() else {}
    rows = saved.get("rows", {}) if saved.get("settings") == settings else {}
    model_dir = bundled_model_dir()

    jobs = [("fp16", "-", None)]
    jobs += [(name, lv, cfg) for lv in levels for name, cfg in level_methods(lv, args.calib).items()]
    for i, (name, level, cfg) in enumerate(jobs, 1):
        key = f"{name}@{level}"
        if key in rows:
            print(f"[{i}/{len(jobs)}] {key}: kept from {rows_path}", flush=True)
            continue
        t0 = time.time()
        if cfg is None:
            path, bits, compress_s = model_dir, 16.0, 0.0
        else:
            path = work / "models" / key.replace("#", "sharp").replace("+", "-")
            bits = compress(model_dir, path, cfg, calib=data["calib"], device=args.device).report[
                "avg_bits_per_original_param"]
            compress_s = time.time() - t0
        row = score_model(path, tasks, work / "results" / f"{path.name}.json", args.device)
        rows[key] = {"method": name, "level": level, "avg_bits": bits, "compress_s": round(compress_s, 1),
                     "eval_s": round(time.time() - t0 - compress_s, 1), **row}
        atomic_write_json(rows_path, {"settings": settings, "rows": rows})
        print(f"[{i}/{len(jobs)}] {key}: {bits:.3f} bits, VQA EM {row['vqa_em']:.3f}, CIDEr {row['cider']:.3f}",
              flush=True)

    write_tables(Path(args.out), rows, levels, args)
    return 0


def write_tables(out: Path, rows: dict, levels: list[str], args) -> None:
    methods = ["RTN", "GPTQ", "QuIP#", "CASP+RTN", "CASP+GPTQ", "CASP+QuIP#"]
    fp16 = rows["fp16@-"]

    def cell(key: str) -> str:
        r = rows.get(key)
        return "" if r is None else f"{r['vqa_em']:.3f} / {r['cider']:.2f} ({r['avg_bits']:.2f} b)"

    lines = [
        "# Quality vs bits on the demo VLM: VQA exact match / caption CIDEr (average bits)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/demo_levels.py --levels {','.join(levels)} --test {args.test} "
        f"--calib {args.calib} --device {args.device}`",
        f"Model: the bundled demo VLM (casp/demo/assets/demo-model); {args.test} held-out questions (types balanced), "
        f"{max(args.test // 4, 8)} held-out captions, {args.calib} calibration conversations, greedy decoding.",
        "Average bits: measured bits per original parameter of the compressed linears, every overhead counted.",
        "",
        f"fp16: VQA EM {fp16['vqa_em']:.3f}, CIDEr {fp16['cider']:.2f}",
        "",
        "| method | " + " | ".join(f"~{lv} bits" for lv in levels) + " |",
        "| --- | " + " | ".join("---" for _ in levels) + " |",
    ]
    lines += [f"| {m} | " + " | ".join(cell(f"{m}@{lv}") for lv in levels) + " |" for m in methods]
    lines += ["", "| run | avg bits | VQA EM | CIDEr | compress s | eval s | per question type |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in rows.items():
        per = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["per_type"].items()))
        lines.append(f"| {key} | {r['avg_bits']:.3f} | {r['vqa_em']:.3f} | {r['cider']:.3f} | {r['compress_s']} | "
                     f"{r['eval_s']} | {per} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    atomic_write_json(out.with_suffix(".json"), {"levels": levels, "rows": rows})
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
