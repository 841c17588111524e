"""The device side on aarch64, as a Raspberry Pi / Jetson runs it, under qemu user emulation.

    sudo .venv/bin/python tools/aarch64_check.py [--install-prerequisites] [--steps 4]

1. Host prerequisites: qemu-user-static, debootstrap, binfmt-support (installed with apt-get
   when --install-prerequisites), binfmt_misc mounted, qemu-aarch64 registered with the F
   flag (the kernel keeps the interpreter open, so nothing of qemu goes into the userland).
2. Arm64 Debian userlands (debootstrap, minbase + python3): bookworm (Python 3.11) with one
   venv per onnxruntime, "oldest" (the artifacts' minimum, numpy<2) and "newest" (no pins),
   and bullseye (Python 3.9, glibc 2.31: the oldest the device side claims) with "oldest".
   Each venv holds the `device` extra's dependencies from pyproject.toml, installed with pip
   from PyPI, i.e. the stock aarch64 wheels; no torch. Each finished userland is cached as
   a tarball in --cache (key: suite, packages, requirements, the newest versions on PyPI),
   so only the first run pays for debootstrap and pip under emulation.
3. A tiny model (a 4-block inverted-residual net, 32 px, last 4 convs, HOSVD eps 0.9) is
   exported on the host and trained natively with .venv's `actcomp-device`; then, in each
   venv, this checkout is pip-installed (no deps: they are the cached ones, `pip check`
   verifies them) and its `actcomp-device train` runs the same steps on the same data.
4. Per-step losses (from the runner's file:// profile stream) and the trained weights must
   agree with the native run to --rtol (1e-4) relative, the HOSVD ranks exactly.
5. The fleet: bookworm's "newest" venv also holds the `fleet` extra (flwr, Python >= 3.11:
   not on bullseye); its ClientApp module
   imports, and a `flower-supernode` in the userland joins a native `flower-superlink`
   for one round of `actcomp fleet run`; the global weights must come back as the node's.

Exit 0 when every runtime agrees; 1 with the reason otherwise (a runner that fails on
aarch64, e.g. by importing torch, which is not there, fails the check). Never time anything
here: emulated onnxruntime is hundreds of times slower than native.

Pitfalls this script handles: onnxruntime aborts at import under qemu unless the userland
sees an aarch64 /proc/cpuinfo (a Cortex-A72 one is bind-mounted over it, QEMU_CPU is set)
and /sys (its cpuinfo library reads /sys/devices/system/cpu); pip in the chroot needs the
host's CA certificates and a clean environment (env -i); mounts live in a private mount
namespace (unshare -m), so nothing stays mounted if the script dies.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Debian suite -> the venvs its userland holds (``runtime_requirements``)
SUITES = {"bookworm": ("oldest", "newest"), "bullseye": ("oldest",)}
DEBIAN_PACKAGES = ["python3", "python3-venv", "ca-certificates"]
HOST_PACKAGES = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap",
                 "update-binfmts": "binfmt-support"}
BUILD_REQUIREMENTS = ["setuptools>=61", "wheel"]  # to pip-install the checkout without the network
USERLAND_LAYOUT = 2  # bump when the way the userland is built changes (2: pip upgraded)
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
GUEST_CA = "/etc/ssl/certs/host-ca.crt"
CPUINFO = "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 "
                  f"cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
                  f"CPU part\t: 0xd08\nCPU revision\t: 3\n\n" for i in range(4))  # Cortex-A72
GUEST_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root",
             "LANG": "C.UTF-8", "QEMU_CPU": "cortex-a72", "PIP_CERT": GUEST_CA,
             "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1",
             "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
             "OPENBLAS_NUM_THREADS": "1"}


class CheckError(RuntimeError):
    """The check cannot run, or the device side failed on aarch64 (one line)."""


def log(message: str) -> None:
    print(f"[aarch64 {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    """Run cmd; CheckError with the tail of its output when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise CheckError(f"{' '.join(map(str, cmd))[:200]} exited {proc.returncode}:\n{tail}")
    return proc


# ---------------------------------------------------------------- host

def host_prerequisites(install: bool) -> None:
    if os.geteuid() != 0:
        raise CheckError("needs root (debootstrap, chroot, mounts): run it with sudo")
    missing = [pkg for tool, pkg in HOST_PACKAGES.items() if not shutil.which(tool)]
    if missing:
        if not install:
            raise CheckError(f"missing Debian packages {' '.join(missing)}: apt-get install "
                             f"them, or pass --install-prerequisites")
        log(f"installing {' '.join(missing)}")
        run(["apt-get", "update", "-q"])
        run(["apt-get", "install", "-y", "-q", *missing],
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)])
    entry = binfmt / "qemu-aarch64"
    if not entry.exists():
        run(["update-binfmts", "--enable", "qemu-aarch64"])
    text = entry.read_text() if entry.exists() else ""
    if "enabled" not in text:
        raise CheckError("qemu-aarch64 is not registered with binfmt_misc "
                         "(update-binfmts --enable qemu-aarch64 failed)")
    flags = re.search(r"^flags: *(\S*)", text, re.M)
    if not flags or "F" not in flags.group(1):
        raise CheckError("qemu-aarch64 is registered without the F flag: install Debian's "
                         "qemu-user-static (it registers with F)")


def debian_mirror() -> str:
    """The host's own Debian mirror (from its apt sources), for debootstrap."""
    texts = [p.read_text() for p in [Path("/etc/apt/sources.list"),
                                     *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
             if p.is_file() and "disabled" not in p.name]
    for text in texts:
        for match in re.finditer(r"^URIs:\s*(\S+)", text, re.M):          # deb822 .sources
            if match.group(1).rstrip("/").endswith("/debian"):
                return match.group(1)
        for match in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s", text, re.M):  # one-line
            if match.group(1).rstrip("/").endswith("/debian"):
                return match.group(1)
    raise CheckError("found no Debian mirror in /etc/apt/sources*: pass --mirror URL")


def extra(name: str) -> list:
    """An extra of pyproject.toml."""
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"][name])


def runtime_requirements(suite: str) -> dict:
    """venv name -> pip requirements, for the venvs of the suite (SUITES): the device extra
    (and what builds the checkout), pinned to the oldest supported onnxruntime (it needs
    numpy<2) or left to the newest; the newest also holds the fleet extra (Flower's
    SuperNode and the ClientApp)."""
    from actcomp_edge.core.manifest import MIN_ONNXRUNTIME
    base = extra("device") + BUILD_REQUIREMENTS
    venvs = {"oldest": base + [f"onnxruntime=={MIN_ONNXRUNTIME}", "numpy<2"],
             "newest": base + extra("fleet")}
    return {name: venvs[name] for name in SUITES[suite]}


def newest_on_pypi(names) -> dict:
    """name -> newest version pip can see (for the cache key; {} when pip cannot tell)."""
    found = {}
    for name in names:
        proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                              capture_output=True, text=True)
        match = re.search(rf"^{re.escape(name)} \(([^)]+)\)", proc.stdout, re.M)
        if match:
            found[name] = match.group(1)
    return found


def userland_key(suite: str, requirements: dict) -> str:
    facts = {"layout": USERLAND_LAYOUT, "suite": suite, "packages": DEBIAN_PACKAGES,
             "requirements": requirements,
             "newest": newest_on_pypi(["onnxruntime", "numpy", "pyserial", "Pillow"])}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the arm64 userland

def guest_command(root: Path, *cmd, binds=(), env=()) -> tuple:
    """(argv, environment) running cmd inside the userland: a private mount namespace with
    /proc (an aarch64 cpuinfo over it), /sys and /dev, then chroot, with a clean
    environment (GUEST_ENV, then env's pairs)."""
    cpuinfo = root / "tmp" / "aarch64-cpuinfo"
    cpuinfo.write_text(CPUINFO)
    mounts = ['mount -t proc proc "$ROOT/proc"',
              'mount --bind "$ROOT/tmp/aarch64-cpuinfo" "$ROOT/proc/cpuinfo"',
              'mount -t sysfs sysfs "$ROOT/sys"', 'mount --bind /dev "$ROOT/dev"']
    for source, target in binds:
        (root / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
        mounts.append(f'mount --bind {shlex.quote(str(source))} "$ROOT"{shlex.quote(target)}')
    script = " && ".join(mounts) + ' && exec env -i ' + " ".join(
        f"{k}={shlex.quote(v)}" for k, v in dict(GUEST_ENV, **dict(env)).items()) + \
        ' chroot "$ROOT" "$@"'
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "guest",
               *map(str, cmd)]
    return command, dict(os.environ, ROOT=str(root))


def guest(root: Path, *cmd, check=True, binds=()) -> subprocess.CompletedProcess:
    """Run cmd inside the userland (guest_command) and wait."""
    command, env = guest_command(root, *cmd, binds=binds)
    return run(command, env=env) if check else subprocess.run(command, env=env,
                                                              capture_output=True, text=True)


def build_userland(root: Path, suite: str, mirror: str, requirements: dict) -> None:
    log(f"debootstrap arm64 {suite} (minbase + {', '.join(DEBIAN_PACKAGES)}) from the host's "
        f"mirror: about 5 minutes under emulation")
    run(["debootstrap", "--arch=arm64", "--variant=minbase",
         f"--include={','.join(DEBIAN_PACKAGES)}", suite, str(root), mirror])
    shutil.copyfile(HOST_CA, root / GUEST_CA.lstrip("/"))
    for name, reqs in requirements.items():
        log(f"venv /opt/ort-{name}: pip install {' '.join(reqs)} (emulated pip: minutes)")
        guest(root, "python3", "-m", "venv", f"/opt/ort-{name}")
        # bullseye's pip (20.3) predates some wheels' metadata: a current one first
        guest(root, f"/opt/ort-{name}/bin/pip", "install", "-q", "--upgrade", "pip")
        guest(root, f"/opt/ort-{name}/bin/pip", "install", "-q", *reqs)
    shutil.rmtree(root / "root" / ".cache", ignore_errors=True)


def cached_userland(cache: Path, work: Path, suite: str, mirror: str | None,
                    requirements: dict) -> Path:
    """work/root-<suite>, extracted from the cache or built (and then cached)."""
    key = userland_key(suite, requirements)
    tarball = cache / f"aarch64-{suite}-{key}.tar.gz"
    root = work / f"root-{suite}"
    if tarball.is_file():
        log(f"userland from the cache: {tarball}")
        root.mkdir()
        run(["tar", "-C", str(root), "-xzf", str(tarball)])
        return root
    log(f"no cached userland for key {key} in {cache}: building it")
    build_userland(root, suite, mirror or debian_mirror(), requirements)
    cache.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(f".{tarball.name}.partial-{os.getpid()}")
    log(f"caching the userland as {tarball}")
    run(["tar", "-C", str(root), "--exclude=./proc/*", "--exclude=./sys/*", "--exclude=./dev/*",
         "-czf", str(partial), "."])
    os.replace(partial, tarball)
    for old in cache.glob(f"aarch64-{suite}-*.tar.gz"):  # older keys are stale
        if old != tarball:
            old.unlink()
    return root


# ---------------------------------------------------------------- the check

def tiny_artifact(work: Path) -> tuple:
    """(artifact folder, dataset .npz) exported with the host's .venv."""
    from actcomp_edge.core.arch import HALF_NORM, inverted_residual_spec
    import numpy as np
    table = [(3, 1, 1, 8, 8), (3, 2, 3, 8, 16), (3, 1, 3, 16, 16), (3, 2, 3, 16, 24)]
    spec = inverted_residual_spec("tiny-ir", 8, table, 3, 32, HALF_NORM)
    (work / "tiny.json").write_text(json.dumps(spec))
    artifact = work / "art"
    run([REPO / ".venv" / "bin" / "actcomp", "export", "--force", "--model", work / "tiny.json",
         "--num-classes", "3", "--layers", "4", "--method", "hosvd", "--eps", "0.9",
         "--batch-size", "4", "--input-size", "32", "--seed", "1", "-o", artifact])
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (24, 4, 4, 3))
    images = np.kron(low, np.ones((1, 8, 8, 1))).astype(np.uint8)
    labels = (low.mean(axis=(1, 2, 3)) // 86).astype(np.int64).clip(0, 2)
    np.savez(work / "data.npz", images=images, labels=labels)
    return artifact, work / "data.npz"


def train_argv(runner, artifact, data, out, steps: int, kernels: str = "auto") -> list:
    return [runner, "train", artifact, "--data", data, "--max-steps", str(steps),
            "--batch-size", "4", "--lr", "0.05", "--threads", "1", "--checkpoint-every", "2",
            "--profile", "pi-zero-2w", "--out", out, "--summary", f"{out}/summary.json",
            "--report", f"file://{out}/profile.jsonl", "--kernels", kernels]


def results(out: Path) -> dict:
    import numpy as np
    records = [json.loads(line) for line in (out / "profile.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("type") == "step"]
    with np.load(out / "weights.npz", allow_pickle=False) as w:
        weights = {k: w[k] for k in w.files}
    return {"loss": [r["loss"] for r in steps], "ranks": [r["ranks"] for r in steps],
            "weights": weights}


def compare(name: str, got: dict, want: dict, rtol: float) -> list:
    """Disagreements of one aarch64 run with the native one (empty: they agree)."""
    import numpy as np
    problems = []
    if len(got["loss"]) != len(want["loss"]):
        return [f"{name}: {len(got['loss'])} steps, native {len(want['loss'])}"]
    for step, (a, b) in enumerate(zip(got["loss"], want["loss"]), 1):
        if abs(a - b) > rtol * abs(b):
            problems.append(f"{name}: step {step} loss {a!r}, native {b!r}")
    if got["ranks"] != want["ranks"]:
        problems.append(f"{name}: HOSVD ranks {got['ranks']}, native {want['ranks']}")
    worst = 0.0
    for key, value in want["weights"].items():
        rel = float(np.linalg.norm(got["weights"][key] - value) / max(np.linalg.norm(value), 1e-30))
        worst = max(worst, rel)
        if rel > rtol:
            problems.append(f"{name}: weights {key} differ by {rel:.2e} relative")
    log(f"{name}: losses {', '.join(f'{x:.6f}' for x in got['loss'])}; "
        f"worst weight difference {worst:.2e} relative")
    return problems


def check(args) -> None:
    started = time.monotonic()
    host_prerequisites(args.install_prerequisites)
    work = Path(tempfile.mkdtemp(prefix="actcomp-aarch64-", dir=args.work))
    try:
        artifact, data = tiny_artifact(work)
        native = work / "native"
        # the graphs aarch64 runs: its onnxruntime wheels have no NCHWc kernels, and an eps
        # rank can differ by the kernels' rounding
        run(train_argv(REPO / ".venv" / "bin" / "actcomp-device", artifact, data, native,
                       args.steps, kernels="portable"))
        want = results(native)
        log(f"native x86_64: losses {', '.join(f'{x:.6f}' for x in want['loss'])}")
        for suite in args.suites:
            check_suite(args, suite, work, artifact, data, want)
        log(f"passed: every runtime of {', '.join(args.suites)} agrees with native to "
            f"{args.rtol:g} relative; {time.monotonic() - started:.0f} s in all")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def check_suite(args, suite: str, work: Path, artifact: Path, data: Path, want: dict) -> None:
    """Train in each venv of the suite's userland (and, with "newest", the fleet round)."""
    started = time.monotonic()
    requirements = runtime_requirements(suite)
    root = cached_userland(Path(args.cache), work, suite, args.mirror, requirements)
    log(f"{suite} userland ready after {time.monotonic() - started:.0f} s")
    # the checkout, copied (pip builds in the source tree) without venvs or outputs
    shutil.copytree(REPO, root / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv*", "out", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    problems = []
    for name in requirements:
        venv = f"/opt/ort-{name}"
        guest(root, f"{venv}/bin/pip", "install", "-q", "--no-deps", "--no-build-isolation",
              "/src")
        guest(root, f"{venv}/bin/pip", "check")
        versions = guest(root, f"{venv}/bin/python", "-c",
                         "import numpy, onnxruntime, platform; print(platform.machine(), "
                         "onnxruntime.__version__, numpy.__version__, "
                         "platform.python_version())").stdout.split()
        log(f"{suite} {name}: {' '.join(versions)}; training {args.steps} steps")
        if versions[0] != "aarch64":
            raise CheckError(f"the userland runs {versions[0]}, not aarch64")
        out = f"run-{suite}-{name}"
        proc = guest(root, *train_argv(f"{venv}/bin/actcomp-device", "/data/art",
                                       "/data/data.npz", f"/data/{out}", args.steps),
                     binds=[(work, "/data")], check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise CheckError(f"actcomp-device train failed on aarch64 {suite} (Python "
                             f"{versions[3]}) with onnxruntime {versions[1]} (exit "
                             f"{proc.returncode}):\n{tail}")
        problems += compare(f"aarch64 {suite} Python {versions[3]} onnxruntime {versions[1]} "
                            f"numpy {versions[2]}", results(work / out), want, args.rtol)
    if problems:
        raise CheckError("aarch64 and native disagree:\n" + "\n".join(problems))
    if "newest" in requirements:
        fleet_round(root, work, artifact, data)
    log(f"{suite}: {time.monotonic() - started:.0f} s")


def fleet_round(root: Path, work: Path, artifact: Path, data: Path) -> None:
    """One Flower round with the ClientApp on aarch64: a native SuperLink and `actcomp fleet
    run` on the host, a SuperNode in the emulated userland ("newest" venv, the fleet extra);
    the global weights after the round must be the node's (FedAvg of one node)."""
    import numpy as np
    from actcomp_edge.host.fleet import Processes, free_port, wait_for_port
    bin_dir = REPO / ".venv" / "bin"
    venv = "/opt/ort-newest"
    guest(root, f"{venv}/bin/python", "-c", "import device_runner.fleet")  # the ClientApp
    port, started = free_port(), time.monotonic()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    (work / "fleet-logs").mkdir()
    procs = Processes(work / "fleet-logs", env)
    try:
        superlink = procs.start("superlink", [
            bin_dir / "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
            str(port), "--disable-runtime-dependency-installation"])
        wait_for_port(port, superlink, "flower-superlink")
        config = ('artifact="/data/art" data="/data/data.npz" out="/data/fleet-node" '
                  'name="aarch64" threads=1 batch-size=4')
        command, node_env = guest_command(
            root, f"{venv}/bin/flower-supernode", "--insecure", "--superlink",
            f"127.0.0.1:{port}", "--port", str(free_port()), "--node-config", config,
            binds=[(work, "/data")], env={"PATH": f"{venv}/bin:{GUEST_ENV['PATH']}"})
        procs.start("aarch64-supernode", command, env=node_env)
        log(f"fleet: a SuperNode under emulation joins a native SuperLink on 127.0.0.1:{port}; "
            f"one round of one local epoch (6 steps)")
        run([bin_dir / "actcomp", "fleet", "run", artifact, "--superlink", f"127.0.0.1:{port}",
             "--min-nodes", "1", "--rounds", "1", "--val-data", data, "--threads", "1",
             "--round-timeout", "1800", "--out", work / "fleet-server"], env=env, timeout=2400)
    except subprocess.TimeoutExpired:
        raise CheckError("the fleet round under emulation did not finish in 40 minutes "
                         f"(logs: {work / 'fleet-logs'}; --keep keeps them)") from None
    finally:
        procs.stop()
    summary = json.loads((work / "fleet-server" / "summary.json").read_text())
    round_one = summary["rounds"][1]
    if round_one["nodes_replied"] != 1 or round_one["failures"]:
        raise CheckError(f"the aarch64 node's round failed: {round_one['failures']}")
    with np.load(work / "fleet-server" / "server" / "global_weights.npz") as g, \
            np.load(work / "fleet-node" / "round-0001" / "weights.npz") as w:
        worst = max(float(np.abs(g[k] - w[k]).max() / (np.abs(w[k]).max() + 1e-12))
                    for k in w.files)
    if worst > 1e-6:
        raise CheckError(f"the global weights differ from the aarch64 node's by {worst:.2g}")
    node = summary["nodes"][0]
    log(f"fleet: the aarch64 node trained round 1 in {time.monotonic() - started:.0f} s "
        f"(emulated), val accuracy {round_one['val_accuracy']:.4f}, peak RSS "
        f"{node['peak_rss_bytes'] / 2 ** 20:.1f} MiB; the global weights are the node's")


def main(argv=None) -> int:
    default_cache = os.environ.get("ACTCOMP_CACHE") or str(Path.home() / ".cache" / "actcomp-edge")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=default_cache,
                        help="where the finished userland tarball is kept (default "
                             "$ACTCOMP_CACHE or ~/.cache/actcomp-edge)")
    parser.add_argument("--work", help="scratch folder (default: the system temp folder)")
    parser.add_argument("--mirror", help="Debian mirror URL (default: the host's apt source)")
    parser.add_argument("--suites", default=",".join(SUITES), type=lambda v: v.split(","),
                        help=f"Debian suites to check, comma-separated (default: "
                             f"{','.join(SUITES)})")
    parser.add_argument("--steps", type=int, default=4, help="training steps (default 4)")
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="relative agreement of losses and weights (default 1e-4)")
    parser.add_argument("--install-prerequisites", action="store_true",
                        help="apt-get install qemu-user-static, debootstrap, binfmt-support")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    unknown = [suite for suite in args.suites if suite not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r} (choose from {', '.join(SUITES)})")
    try:
        check(args)
    except CheckError as e:
        print(f"aarch64 check FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
