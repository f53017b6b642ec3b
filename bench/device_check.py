"""The prepared GPU check (run through bench/device_check.sh): gpu test tier, then device_bench.py.

Built for a lent machine that is bare: Python with torch, triton, transformers, safetensors and
grpcio installed, nothing fetchable, this repository copied over, 8 minutes in all. So this driver
uses the standard library only and prepares the rest itself, in a scratch directory:
- pure-Python test packages the machine lacks (pytest and its dependencies, pytest-timeout) are
  unpacked from the wheels in bench/wheels (never over an installed one);
- `moeserve` is imported from this checkout through a small package shim (the same mapping as
  pyproject's package-dir: protos/moeserve is `moeserve`, workers/ is `moeserve.workers`), so
  nothing is installed and an older installed moeserve cannot shadow it;
- the gpu tier runs without conftest files plus bench/gpu_tier_plugin.py (see there), so the other
  tiers' packages are not needed.
Each phase runs in a subprocess under its own time limit, cut to what is left of the total, and
the driver always writes $OUT/device_check.json (phases that ran out of time say so).

`--cpu-rehearsal` runs every step on the CPU with the tiny preset and small sizes, so the first GPU
run is not the script's first run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOTAL_S = 470  # the machine gives 8 minutes; keep a margin for start-up and the copy back
TIER_S = 170
# a CPU test that needs the root conftest's fixtures, for the rehearsal of the tier's set-up
REHEARSAL_TEST = "tests/unit/test_model_parity.py::test_fp32_prefill_logits_match_transformers[v2]"
# wheel file prefix -> the module it provides
WHEELS = {
    "pytest-": "pytest",
    "pluggy-": "pluggy",
    "iniconfig-": "iniconfig",
    "packaging-": "packaging",
    "pygments-": "pygments",
    "pytest_timeout-": "pytest_timeout",
}
VERSIONS = """
import json, torch, triton, transformers, moeserve.workers as w
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "triton": triton.__version__,
                  "transformers": transformers.__version__, "cuda": cuda,
                  "gpu": torch.cuda.get_device_name() if cuda else None,
                  "moeserve_from": w.__path__[0]}))
"""
SHIM_INIT = '''"""moeserve imported from {root} (device_check.py's shim; the real __init__ follows)."""
__path__ = [{shim!r}, {protos!r}]
exec(compile(open({init!r}).read(), {init!r}, "exec"))
'''


def unpack_missing_wheels(target: Path, every: bool = False) -> list[str]:
    """Unpack bench/wheels' packages whose module this Python cannot import (`every`: all of them,
    as the rehearsal does so that this path runs before a machine needs it); returns their names."""
    unpacked = []
    for wheel in sorted((ROOT / "bench" / "wheels").glob("*.whl")):
        module = next((m for prefix, m in WHEELS.items() if wheel.name.startswith(prefix)), None)
        if module is None or (importlib.util.find_spec(module) is not None and not every):
            continue
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        unpacked.append(wheel.name)
    return unpacked


def make_shim(target: Path) -> Path:
    package = target / "moeserve"
    package.mkdir(parents=True)
    protos = ROOT / "protos" / "moeserve"
    init = protos / "__init__.py"
    (package / "__init__.py").write_text(
        SHIM_INIT.format(root=ROOT, shim=str(package), protos=str(protos), init=str(init))
    )
    (package / "workers").symlink_to(ROOT / "workers")
    (package / "operator").symlink_to(ROOT / "operator")
    return target


def run_phase(name: str, cmd: list[str], env: dict[str, str], timeout: float, out: Path) -> dict[str, Any]:
    """Runs one phase, its output teed to OUT/<name>.log; returns rc, seconds, timed_out, tail."""
    print(f"== {name}: {' '.join(cmd)} (limit {timeout:.0f} s)", flush=True)
    log = out / f"{name}.log"
    t0 = time.monotonic()
    timed_out = False
    with log.open("w") as sink:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        deadline = t0 + timeout
        for line in proc.stdout:
            sys.stdout.write(line)
            sink.write(line)
            if time.monotonic() > deadline:
                timed_out = True
                break
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        if timed_out:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - t0
    tail = log.read_text()[-3000:]
    print(
        f"== {name}: rc {proc.returncode}{' (timed out)' if timed_out else ''} in {seconds:.0f} s", flush=True
    )
    return {"rc": proc.returncode, "seconds": round(seconds, 1), "timed_out": timed_out, "log_tail": tail}


def tier_counts(junit: Path) -> dict[str, int]:
    if not junit.exists():
        return {}
    head = junit.read_text()[:2000]
    suite = re.search(r"<testsuite [^>]*>", head)
    if suite is None:
        return {}
    return {k: int(v) for k, v in re.findall(r'\b(tests|failures|errors|skipped)="(\d+)"', suite[0])}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-rehearsal", action="store_true", help="every step on the CPU, tiny preset")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/moeserve-device-check")
    )
    parser.add_argument("--skip-tier", action="store_true", help="only the benchmark")
    args = parser.parse_args()
    start = time.monotonic()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="moeserve-device-check-"))
    deps = scratch / "pydeps"
    unpacked = unpack_missing_wheels(deps, every=args.cpu_rehearsal)
    shim = make_shim(scratch / "shim")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(shim), str(deps), str(ROOT / "bench"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env.pop("TRITON_INTERPRET", None)  # kernels compile on the GPU; the rehearsal's gpu tests skip
    if args.cpu_rehearsal:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal on a GPU machine still takes the CPU paths
    report: dict[str, Any] = {
        "mode": "cpu-rehearsal" if args.cpu_rehearsal else "gpu",
        "python": sys.version.split()[0],
        "unpacked_wheels": unpacked,
    }
    versions = subprocess.run(
        [sys.executable, "-c", VERSIONS], env=env, capture_output=True, text=True, timeout=120
    )
    report["env"] = (
        json.loads(versions.stdout) if versions.returncode == 0 else {"error": versions.stderr[-2000:]}
    )
    print("environment:", json.dumps(report["env"]), flush=True)

    def left() -> float:
        return TOTAL_S - (time.monotonic() - start)

    if not args.skip_tier:
        junit = out / "gpu_tier.xml"
        tier = run_phase(
            "gpu_tier",
            [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "--noconftest",
             "-p", "gpu_tier_plugin", "-p", "no:cacheprovider", f"--junitxml={junit}"],
            env, min(TIER_S, left() - 120), out,
        )  # fmt: skip
        tier.update(tier_counts(junit))
        report["gpu_tier"] = tier
        if args.cpu_rehearsal:  # the gpu tests skip here: run one CPU test through the same set-up
            report["tier_setup_rehearsal"] = run_phase(
                "tier_setup_rehearsal",
                [sys.executable, "-m", "pytest", REHEARSAL_TEST, "-q", "--noconftest",
                 "-p", "gpu_tier_plugin", "-p", "no:cacheprovider"],
                env, 150, out,
            )  # fmt: skip
    bench_json = out / "bench.json"
    sizes = (
        ["--preset", "tiny", "--device", "cpu", "--batches", "1,16", "--prompt", "32", "--new-tokens", "4",
         "--ttft-prompt", "256"]
        if args.cpu_rehearsal
        else ["--preset", "v2-lite", "--device", "cuda", "--batches", "1,16,64,256", "--prompt", "128",
              "--new-tokens", "32", "--ttft-prompt", "4096"]
    )  # fmt: skip
    bench = run_phase(
        "bench",
        [sys.executable, "bench/device_bench.py", *sizes, "--out", str(bench_json)],
        env,
        left() - 5,
        out,
    )
    if bench_json.exists():
        bench["result"] = json.loads(bench_json.read_text())
    report["bench"] = bench
    report["seconds"] = round(time.monotonic() - start, 1)
    (out / "device_check.json").write_text(json.dumps(report, indent=2))
    print_summary(report)
    phases = [report.get(k, {"rc": 0}) for k in ("gpu_tier", "tier_setup_rehearsal")]
    ok = bench["rc"] == 0 and all(p["rc"] == 0 for p in phases)
    return 0 if ok else 1


def print_summary(report: dict[str, Any]) -> None:
    print(f"\n== summary ({report['mode']}, {report['seconds']} s)")
    tier = report.get("gpu_tier")
    if tier:
        counts = {k: tier.get(k) for k in ("tests", "failures", "errors", "skipped")}
        print(f"gpu tier: rc {tier['rc']}{' TIMED OUT' if tier['timed_out'] else ''} {counts}")
    setup = report.get("tier_setup_rehearsal")
    if setup:
        print(f"gpu tier set-up rehearsal ({REHEARSAL_TEST}): rc {setup['rc']}")
    result = report["bench"].get("result")
    if not result:
        print(f"bench: rc {report['bench']['rc']}, no result")
        return
    print(f"{'batch':>5} {'graphs tok/s':>13} {'eager tok/s':>12} {'hf tok/s':>9} {'graphs/hf':>9} "
          f"{'eager/hf':>8} {'graphs/eager':>12}")  # fmt: skip
    for row in result["decode"]:
        cells = [row.get(k) for k in ("moeserve_graphs_tok_s", "moeserve_eager_tok_s", "transformers_tok_s",
                                      "moeserve_graphs_vs_transformers", "moeserve_eager_vs_transformers",
                                      "graphs_vs_eager")]  # fmt: skip
        text = ["-" if c is None else f"{c:.2f}" for c in cells]
        widths = (13, 12, 9, 9, 8, 12)
        print(f"{row['batch']:>5} " + " ".join(f"{t:>{w}}" for t, w in zip(text, widths, strict=True)))
    roof = result["roofline"]
    frac = roof["batch1_fraction"]
    print(
        f"roofline: {roof['active_weight_bytes_per_token'] / 1e9:.2f} GB/token at "
        f"{roof['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s -> {roof['roofline_tok_s']:.1f} tok/s; "
        f"batch 1 reaches {'-' if frac is None else f'{frac:.1%}'}"
    )
    ttft = result["ttft"]
    print(f"TTFT ({ttft['prompt_tokens']} tokens): moeserve {ttft['moeserve_s']:.3f} s, "
          f"transformers {ttft['transformers_s']:.3f} s")  # fmt: skip
    print(f"peak memory: {result['peak_memory']}")
    print(f"logits max rel diff vs transformers: {result['logits_max_rel_diff_vs_transformers']:.2e}")
    print(f"targets: {result['targets']}")


if __name__ == "__main__":
    sys.exit(main())
