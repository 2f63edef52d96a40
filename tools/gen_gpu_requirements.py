"""The wheels tools/gpu_check.py needs beyond a stock CUDA PyTorch image: tools/gpu_check_requirements.txt.

    python tools/gen_gpu_requirements.py          # rewrite the file (runs the CPU dry run, about a minute)

What the check imports is measured, not listed by hand: the CPU dry run's imported modules, mapped to their
distributions, closed over their declared requirements, less what a CUDA PyTorch image already has (torch,
triton, the nvidia-* libraries and what the lent machines' image holds, IMAGE_HAS) and less this package.
Versions are constraints.txt's. For a GPU machine that fetches nothing (Python 3.12):

    python tools/gen_gpu_requirements.py --wheels .whl    # here: about 19 MiB of wheels
    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl    # there
    PYTHONPATH=/tmp/site python3 tools/gpu_check.py
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tools" / "gpu_check_requirements.txt"
# A CUDA PyTorch image brings these (and the check must use its torch, not a CPU wheel).
IMAGE = re.compile(r"^(torch|triton|nvidia-.*|perceptio-dist|pip|setuptools|wheel)$")
# What the lent GPU machines' image already holds (its package list as read 2026-11-17: device/KINDS.md), less the
# packages whose pinned version the check exercises (CARRIED). Only the rest travels: the wheels must fit in 64 MiB.
IMAGE_HAS = set("""
accelerate annotated-doc anyio attrs certifi charset-normalizer click contourpy cycler einops filelock fonttools
fsspec h11 hf-xet httpcore httpx huggingface-hub idna imageio jinja2 kiwisolver lazy-loader markdown-it-py
markupsafe matplotlib mdurl mpmath msgpack networkx ninja numpy packaging peft pillow portalocker protobuf psutil
py-cpuinfo pygments pyparsing python-dateutil pyyaml regex requests rich safetensors scikit-image scipy shellingham
six sympy tifffile tokenizers tqdm typer typing-extensions urllib3 xxhash torchvision
""".split())
CARRIED = {"transformers", "deepspeed", "sam2"}
# Optional rows: installed where the wheel is carried; the check reports them unavailable otherwise.
OPTIONAL = {"flash-attn", "liger-kernel", "cut-cross-entropy"}
DUMP = ("import atexit, json, sys, runpy\n"
        "out, script = sys.argv[1], sys.argv[2]\n"
        "files = lambda: sorted({getattr(m, '__file__', None) or '' for m in list(sys.modules.values())} - {''})\n"
        "atexit.register(lambda: open(out, 'w').write(json.dumps(files())))\n"
        "sys.argv = [script, '--device', 'cpu']\n"
        "runpy.run_path(script, run_name='__main__')\n")


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions(dump: Path) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", DUMP, str(dump), str(ROOT / "tools" / "gpu_check.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"the CPU dry run failed:\n{proc.stderr[-3000:]}")
    # Files, not top-level names: a namespace such as google.* spans several distributions, of which the run may
    # import one.
    owner = {}
    for dist in metadata.distributions():
        for file in dist.files or []:
            owner[str(Path(dist.locate_file(file)).resolve())] = normal(dist.metadata["Name"])
    return {owner[path] for path in (str(Path(f).resolve()) for f in json.loads(dump.read_text())) if path in owner}


def closure(names: set[str]) -> set[str]:
    """``names`` and what they declare they need, not followed into the packages the image provides (their needs are
    the image's)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if from_image(name):
            continue
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # declared but not installed here (sam2's torchvision): not needed
            seen.discard(name)
            continue
        for req in requires:
            if "extra ==" in req:  # optional extras are not installed with --no-deps either
                continue
            marker_ok = ";" not in req or _marker_holds(req.split(";", 1)[1])
            if marker_ok:
                todo.append(normal(re.split(r"[\s<>=!~\[;(]", req.strip(), maxsplit=1)[0]))
    return seen


def from_image(name: str) -> bool:
    return bool(IMAGE.match(name)) or (name in IMAGE_HAS and name not in CARRIED)


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate({"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux",
                                    "platform_machine": "x86_64", "implementation_name": "cpython"})


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[normal(name)] = version.strip()
    return pins


def render(dump: Path) -> str:
    # This package's own requirements are not followed (it is installed with --no-deps): only what the check imports.
    imported = imported_distributions(dump) - {"perceptio-dist"}
    needed = {n for n in closure(imported) if not from_image(n)} - OPTIONAL
    pins = pinned()
    missing = sorted(n for n in needed if n not in pins)
    if missing:
        raise SystemExit(f"not pinned in constraints.txt: {missing}")
    lines = [f"{name}=={pins[name]}" for name in sorted(needed)]
    return ("# Generated by tools/gen_gpu_requirements.py: what tools/gpu_check.py imports, beyond a CUDA PyTorch\n"
            "# image's torch and triton. pip install --no-deps -r tools/gpu_check_requirements.txt\n" + "\n".join(lines) + "\n")


# What travels to a lent GPU machine, which fetches nothing: Python 3.12 x86-64 wheels, at most 64 MiB in all.
WHEEL_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                  "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
WHEEL_BUDGET = 64 * 2**20


def listed_requirements() -> list[str]:
    return [line for line in OUT.read_text().splitlines() if line and not line.startswith("#")]


def fetch_wheels(folder: Path) -> int:
    """The listed wheels in ``folder``: binary wheels for Python 3.12 where PyPI has them, else built here from the
    sdist (those are pure Python: sam2 without its optional CUDA extension, DeepSpeed with its ops built at run
    time). Returns their total size; refuses a set over the budget."""
    folder.mkdir(parents=True, exist_ok=True)
    for requirement in listed_requirements():
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *WHEEL_PLATFORM,
                    "-d", str(folder), requirement]
        if subprocess.run(download, capture_output=True, text=True).returncode != 0:
            build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder),
                     requirement]
            proc = subprocess.run(build, capture_output=True, text=True, env={**os.environ, "SAM2_BUILD_CUDA": "0"})
            if proc.returncode != 0:
                raise SystemExit(f"no wheel for {requirement}:\n{proc.stderr[-2000:]}")
    wheels = sorted(folder.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    if total > WHEEL_BUDGET:
        raise SystemExit(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB: over the {WHEEL_BUDGET / 2**20:.0f} MiB that "
                         "travels to a GPU machine")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", metavar="DIR", help="instead of regenerating the list, fetch its wheels (Python "
                        "3.12, x86-64) into DIR for a GPU machine that fetches nothing")
    args = parser.parse_args()
    if args.wheels:
        total = fetch_wheels(Path(args.wheels))
        print(f"{len(listed_requirements())} requirements, {total / 2**20:.1f} MiB of wheels in {args.wheels}")
        return
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        text = render(Path(folder) / "modules.json")
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines()) - 2} wheels)")


if __name__ == "__main__":
    main()
