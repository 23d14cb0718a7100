"""Run the export runtime's checks under each transformers 5.x release, each in its own environment.

    python scripts/compat_matrix.py                      # the newest patch of every 5.x minor release
    python scripts/compat_matrix.py --releases 5.0.0,middle,latest
    python scripts/compat_matrix.py --releases 5.12 --tests tests/test_compat.py

For every release, transformers and the dependencies it asks for are installed with pip into
.compat/transformers-X/ (a --target directory put first on PYTHONPATH, so the rest of this Python's
packages, torch included, stay as they are; those only this Python's own transformers asks for, such as kernels,
are hidden from the release) and pytest runs the runtime checks there: identity below the
window, the dense reference beyond it (sdpa and eager, with and without a top-K selection), cached decoding
equal to uncached and to the reference step by step (DPE cache layers, a plain DynamicCache, a static cache),
a left-padded batch equal to single prompts, loading where dpe_export cannot be imported, save/reload,
loud failures, loading by repo id from a local stand-in Hub, a trained testbed's export retrieving at 8x, and
every registry family against the reference computed from its own forward.
Each result is appended to --jsonl as it finishes (one line per release) and the table is printed as
Markdown. Release names: an exact version (5.12.1), a minor (5.12: its newest patch), "oldest", "middle"
or "latest" (looked up on the package index when the script runs).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TESTS = ["tests/test_runtime.py", "tests/test_compat.py", "tests/test_hub_load.py", "tests/test_families.py"]
SUPPORTED = (5, 6)  # [5, 6): keep in step with dpe_guards.MIN/MAX_TRANSFORMERS_VERSION and setup.cfg


def _key(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def available_releases() -> list[str]:
    """Every final transformers release in the supported range, from the package index, oldest first."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"],
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("Available versions:"))
    versions = [v.strip() for v in line.split(":", 1)[1].split(",")]
    final = [v for v in versions if re.fullmatch(r"\d+\.\d+\.\d+", v)]
    return sorted((v for v in final if SUPPORTED[0] <= _key(v)[0] < SUPPORTED[1]), key=_key)


def newest_per_minor(releases: list[str]) -> list[str]:
    best: dict = {}
    for v in releases:
        best[_key(v)[:2]] = v
    return [best[k] for k in sorted(best)]


def resolve(names: list[str], releases: list[str]) -> list[str]:
    minors = newest_per_minor(releases)
    out = []
    for name in names:
        if name == "oldest":
            out.append(minors[0])
        elif name == "latest":
            out.append(minors[-1])
        elif name == "middle":
            out.append(minors[len(minors) // 2])
        elif re.fullmatch(r"\d+\.\d+", name):
            match = [v for v in releases if _key(v)[:2] == _key(name)[:2]]
            if not match:
                raise SystemExit(f"no transformers release {name}.x on the index")
            out.append(match[-1])
        elif name in releases:
            out.append(name)
        else:
            raise SystemExit(f"transformers {name} is not a release in [{SUPPORTED[0]}, {SUPPORTED[1]})")
    return list(dict.fromkeys(out))


# A dependency a release asks for that this package index may lack, and what the checks then set so that the
# release runs without it. transformers 5.25 requires kernels>=0.19.1 and, with hub kernels on (its default),
# refuses every from_pretrained when kernels is missing; on CPU its kernel mapping replaces nothing anyway.
WITHOUT = {"kernels": {"USE_HUB_KERNELS": "0"}}


def _pip(target: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--target", str(target), "--upgrade", *args], capture_output=True, text=True)


def _unavailable(stderr: str) -> str | None:
    """The requirement pip found no distribution of on the index, if that is why it failed."""
    m = re.search(r"No matching distribution found for ([A-Za-z0-9_.-]+)", stderr)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else None


def install(version: str, root: Path) -> Path:
    """transformers==version and its dependencies into root/transformers-<version>. A dependency the index does
    not have is left out when the checks can run without it (WITHOUT); target/.missing lists it."""
    target = root / f"transformers-{version}"
    if (target / ".complete").is_file():
        return target
    proc = _pip(target, f"transformers=={version}")
    missing = _unavailable(proc.stderr) if proc.returncode else None
    if missing in WITHOUT:
        from importlib.metadata import PathDistribution

        proc = _pip(target, "--no-deps", f"transformers=={version}")
        if not proc.returncode:
            info = next(target.glob(f"transformers-{version}.dist-info"))
            needs = [r.split(";")[0] for r in PathDistribution(info).requires or [] if "extra ==" not in r]
            needs = [r for r in needs if re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ \[]", r, 1)[0]).lower() != missing]
            proc = _pip(target, *needs)
        (target / ".missing").write_text(json.dumps([missing]))
    if proc.returncode:
        raise SystemExit(f"pip could not install transformers {version}:\n{proc.stderr[-3000:]}")
    # torch comes from this Python: a dependency that pulled another build of it into the target is an error.
    for extra in ("torch", "triton"):
        if any(target.glob(f"{extra}-*.dist-info")):
            raise SystemExit(f"installing transformers {version} pulled {extra} into {target}; remove it")
    (target / ".complete").write_text(version)
    return target


def _requirement_names(requires) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ ;\[(]", r, 1)[0]).lower()
            for r in requires or [] if "extra ==" not in r}


def hide_host_extras(version: str, target: Path) -> list[str]:
    """Hide from the release the packages this Python has only because its own transformers asks for them.

    The release's environment is target/ first, then this Python's packages (torch and pytest come from there).
    A package the installed transformers requires and the release does not (kernels, since 5.25) would still be
    imported by the release, and an old release can break on a new one (5.0.0's hub_kernels raises at import
    with kernels 0.19), which no user installing that release gets. Each such package gets a stub that raises
    ImportError, in target/.hidden/ (after target/ on the path, so the release's own packages still win).
    Returns the distributions hidden."""
    import importlib.metadata as md
    import shutil

    hidden_dir = target / ".hidden"
    shutil.rmtree(hidden_dir, ignore_errors=True)  # made by this function only
    try:
        host = _requirement_names(md.requires("transformers"))
    except md.PackageNotFoundError:
        return []
    info = next(target.glob(f"transformers-{version}.dist-info"), None)
    wanted = _requirement_names(md.PathDistribution(info).requires) if info else set()
    in_target = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in md.distributions(path=[str(target)])}
    modules: dict[str, list[str]] = {}
    for module, dists in md.packages_distributions().items():
        for dist in dists:
            modules.setdefault(re.sub(r"[-_.]+", "-", dist).lower(), []).append(module)
    hidden = sorted(name for name in host - wanted - in_target if modules.get(name))
    for name in hidden:
        for module in modules[name]:
            stub = hidden_dir / module / "__init__.py"
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text(f"raise ImportError({module!r} ' is hidden: transformers {version} does not require "
                            f"{name} (scripts/compat_matrix.py)')\n")
    return hidden


def run_checks(version: str, target: Path, tests: list[str], timeout: float, pytest_args: list[str] = ()) -> dict:
    missing = json.loads((target / ".missing").read_text()) if (target / ".missing").is_file() else []
    hidden = hide_host_extras(version, target)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(target / ".hidden"), str(REPO)]),
               HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    for name in missing:
        env.update(WITHOUT[name])
    probe = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                           capture_output=True, text=True, env=env, cwd=REPO)
    t0 = time.time()
    try:
        parallel = ["-n", "2"] if importlib.util.find_spec("xdist") else []  # pytest-xdist, from the [test] extra
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                               *parallel, *pytest_args, *tests],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), -1
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped")}
    summary = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary[-1] if summary else ""):
        counts["error" if what.startswith("error") else what] += int(n)
    failures = [ln.split(" - ")[0] for ln in output.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {
        "release": version,
        "imported": probe.stdout.strip(),
        "result": "pass" if rc == 0 and counts["passed"] else "FAIL",
        **counts,
        "failures": failures[:20],
        "seconds": round(time.time() - t0, 1),
        "python": sys.version.split()[0],
        **({"without": {name: WITHOUT[name] for name in missing}} if missing else {}),
        **({"hidden": hidden} if hidden else {}),
    }


def _code_hash() -> str:
    """What was checked: the runtime files and the test files, hashed together."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted([*(REPO / "modeling_templates").glob("dpe_*.py"), *(REPO / "tests").glob("*.py")]):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| transformers | result | checks passed | failed | skipped | seconds |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        without = "".join(f" (without {name}: {', '.join(f'{k}={v}' for k, v in env.items())})"
                          for name, env in r.get("without", {}).items())
        lines.append(f"| {r['release']}{without} | {r['result']} | {r['passed']} | {r['failed'] + r['error']} | "
                     f"{r.get('skipped', 0)} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _installed_transformers() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--releases", help="comma-separated releases (default: newest patch of every 5.x minor)")
    ap.add_argument("--tests", default=",".join(DEFAULT_TESTS), help="comma-separated test files to run")
    ap.add_argument("--root", type=Path, default=REPO / ".compat", help="where the per-release installs go")
    ap.add_argument("--jsonl", type=Path, help="append one JSON line per release here (e.g. benchmarks/results/compat.jsonl)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per release")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression, to run part of the checks")
    ap.add_argument("--resume", action="store_true",
                    help="skip releases that --jsonl already records as run with the same tests, -k and code")
    ap.add_argument("--except-installed", action="store_true",
                    help="leave out the release this Python already has (CI: the whole suite just ran under it)")
    ap.add_argument("--table-from", type=Path, metavar="JSONL",
                    help="print the Markdown table of a --jsonl file (the last line per release) and exit")
    args = ap.parse_args(argv)
    if args.table_from:
        last = {}
        for line in args.table_from.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                last[row["release"]] = row
        print(markdown_table([last[v] for v in sorted(last, key=_key)]))
        return 0

    releases = available_releases()
    chosen = resolve(args.releases.split(","), releases) if args.releases else newest_per_minor(releases)
    if args.except_installed:
        installed = _installed_transformers()
        if installed in chosen:
            print(f"transformers {installed}: this Python's own release, left out (--except-installed)", flush=True)
            chosen = [v for v in chosen if v != installed]
    print(f"transformers releases to check: {', '.join(chosen) or 'none'}", flush=True)
    rows = []
    signature = {"tests": args.tests, "keyword": args.keyword, "code": _code_hash()}
    done = {}
    if args.resume and args.jsonl and args.jsonl.is_file():
        for line in args.jsonl.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if all(row.get(k) == v for k, v in signature.items()):
                done[row["release"]] = row
    for version in chosen:
        if version in done:
            print(f"  transformers {version}: {done[version]['result']} (recorded)", flush=True)
            rows.append(done[version])
            continue
        target = install(version, args.root)
        row = run_checks(version, target, args.tests.split(","), args.timeout,
                         ["-k", args.keyword] if args.keyword else [])
        rows.append(row)
        print(f"  transformers {version}: {row['result']} ({row['passed']} passed, {row['failed']} failed, "
              f"{row['error']} errors, {row['seconds']} s)", flush=True)
        for name, env in row.get("without", {}).items():
            print(f"    {name} is not on this package index: checked without it "
                  f"({', '.join(f'{k}={v}' for k, v in env.items())})", flush=True)
        for f in row["failures"]:
            print(f"    {f}", flush=True)
        if args.jsonl:
            args.jsonl.parent.mkdir(parents=True, exist_ok=True)
            with args.jsonl.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({**row, **signature, "date": time.strftime("%Y-%m-%d")}) + "\n")
    print("\n" + markdown_table(rows))
    return 0 if all(r["result"] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
