"""The Arm check in a full-system VM: real Arm /proc and /sys, not qemu-user's borrowed ones.

    .venv/bin/python -m bench.arm_vm [--cpus cortex-a72,cortex-a53,cortex-a76] [--steps 2000]
                                     [--timeout 3600] [--smp 2]

``scripts/test-arm`` runs the aarch64 wheels under qemu-user with a Raspberry Pi
``/proc/cpuinfo`` bound over the host's and the host's ``/sys``: XNNPACK's CPU detection reads
what the script wrote, not what a machine reports. This one-off bench boots the same Debian
bookworm arm64 root file system (a copy of ``scripts/test-arm``'s cache; run that first) as a
``qemu-system-aarch64 -M virt -cpu MODEL -m 2G`` guest (TCG) with Debian's own arm64 kernel, so
the guest's kernel builds ``/proc/cpuinfo`` and ``/sys`` from the emulated CPU. The guest replays
the closed-loop streams of every test bundle (``tests.arm_check replay``) in ai-edge-litert and
tflite-runtime 2.14, writes them into its disk and powers off; the host compares them with x86
ai-edge-litert / tflite-runtime and prints the table (kernel set x CPU model x bundle).

Pieces: the kernel (``linux-image-*-arm64``; Debian builds virtio-blk and ext4 as modules) and
``busybox-static`` are ``apt-get download``-ed for arm64 into the cache. The initrd holds busybox,
the modules that reach the disk (virtio_mmio, virtio_blk, crc32c_generic, ext4 and what they
depend on, read from each module's ``.modinfo``) and a shell ``/init`` that mounts ``/dev/vda``,
runs the two replays side by side in a chroot, prints the guest's ``/proc/cpuinfo``, ``uname``
and the exit codes on the serial console, and powers off (also after a failure). The disk is
``mkfs.ext4 -d`` of a staging copy holding the wheels, this project's wheel, the test bundles and
the inputs: no network in the guest. The host reads the results back with ``debugfs`` (no loop
mount), so only apt-get needs root. Each VM runs under ``nice -n 10`` and is killed after
``--timeout`` seconds. Needs Debian (apt-get installs qemu-system-arm and e2fsprogs when
missing). Not part of CI. Results: ``build/bench/arm_vm/`` (``table.md``, ``report.json``, the
console logs, the guest's cpuinfo and replay logs).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import BUILD, ROOT, log

RECIPE = 3  # scripts/test-arm's root file system recipe
DEFAULT_CPUS = ("cortex-a72", "cortex-a53", "cortex-a76")
INTERPRETERS = ("litert", "tflite")
ROOT_MODULES = ("virtio_mmio", "virtio_blk", "crc32c_generic", "ext4")
MARK = "ARMVM"  # prefix of the lines the guest's /init prints for the host


class VmError(Exception):
    """A step of the VM check failed; the message says which and why."""


# --- pure logic -------------------------------------------------------------------------------


def modinfo(elf: bytes) -> dict[str, str]:
    """The ``.modinfo`` section of a 64-bit little-endian kernel module (no modinfo tool needed
    on the host: it would be for another architecture anyway)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise VmError("not a 64-bit little-endian ELF module")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]
    out: dict[str, str] = {}
    for name, _type, _flags, _addr, off, size in sections:
        end = elf.index(b"\0", names_off + name)
        if elf[names_off + name : end] == b".modinfo":
            for item in elf[off : off + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    out[key] = value
    return out


def load_order(wanted: list[str], depends: dict[str, list[str]]) -> list[str]:
    """Modules to insmod, dependencies first (depth-first over ``depends``)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name not in depends:
            raise VmError(f"kernel module {name!r} (needed by {' <- '.join(path)}) not found")
        for dep in depends[name]:
            visit(dep, (*path, name))
        seen.add(name)
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def cpio_newc(
    entries: list[tuple[str, int, bytes]], devices: dict[str, tuple[int, int]] | None = None
) -> bytes:
    """An initramfs archive (cpio "newc") of ``(path, mode, data)``; directories and device
    nodes have no data, ``devices`` gives a node's (major, minor)."""
    buf = io.BytesIO()

    def pad(n: int) -> None:
        buf.write(b"\0" * (-n % 4))

    for ino, (path, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        name = path.encode() + b"\0"
        major, minor = (devices or {}).get(path, (0, 0))
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(name), 0)
        buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        pad(110 + len(name))
        buf.write(data)
        pad(len(data))
    return buf.getvalue()


def init_script(modules: list[str]) -> str:
    """The initrd's /init (busybox sh): mount the disk, replay in a chroot, report, power off.
    Every line meant for the host starts with MARK; a failure still powers off (no hang)."""
    replay = " ".join(f"run_replay {i} &" for i in INTERPRETERS)
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
say() {{ echo "{MARK} $*" > /dev/console; }}
finish() {{ say "END $1"; sync; umount /newroot/tmp /newroot/dev /newroot/sys /newroot/proc
    umount /newroot || mount -o remount,ro /newroot; sync; poweroff -f; }}
for m in {" ".join(modules)}; do insmod /modules/$m.ko || {{ say "FAIL insmod $m"; finish 1; }}; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 /dev/vda /newroot || {{ say "FAIL mount /dev/vda"; finish 1; }}
for d in proc sys dev; do mount --bind /$d /newroot/$d; done
mount -t tmpfs tmpfs /newroot/tmp
cpu="$armvm_cpu"
out=/opt/out/$cpu
mkdir -p /newroot$out
cp /proc/cpuinfo /newroot$out/cpuinfo
say "CPUINFO-BEGIN"; sed "s/^/{MARK} | /" /proc/cpuinfo > /dev/console; say "CPUINFO-END"
say "UNAME $(uname -r -m)"
say "NPROC $(grep -c ^processor /proc/cpuinfo)"
run_replay() {{
    t0=$(date +%s)
    env -i PATH=/usr/bin:/bin HOME=/tmp LANG=C.UTF-8 EDGE_LSTM_EXPECT_BACKEND=$1 \\
        PYTHONPATH=/opt/edge-lstm/project:/opt/edge-lstm/src:/opt/wheels/$1 \\
        chroot /newroot /usr/bin/python3 -m tests.arm_check replay /opt/bundles \\
        /opt/edge-lstm/in $out/$1 --backend $1 > /newroot$out/$1.log 2>&1
    rc=$?
    say "REPLAY $1 rc=$rc seconds=$(( $(date +%s) - t0 ))"
    sed "s/^/{MARK} $1: /" /newroot$out/$1.log | tail -n 20 > /dev/console
}}
say "START"
{replay}
wait
finish 0
"""


def parse_console(text: str) -> dict[str, object]:
    """What the guest reported: {'cpuinfo': [...], 'replays': {interp: (rc, seconds)},
    'end': rc or None, 'fail': [...], 'uname': str}."""
    cpuinfo: list[str] = []
    replays: dict[str, tuple[int, int]] = {}
    fails: list[str] = []
    end: int | None = None
    uname = ""
    for raw in text.splitlines():
        line = raw.strip("\r")
        at = line.find(f"{MARK} ")
        if at < 0:
            continue
        body = line[at + len(MARK) + 1 :]
        if body.startswith("| "):
            cpuinfo.append(body[2:])
        elif m := re.match(r"REPLAY (\S+) rc=(\d+) seconds=(\d+)", body):
            replays[m[1]] = (int(m[2]), int(m[3]))
        elif m := re.match(r"END (\d+)", body):
            end = int(m[1])
        elif body.startswith("FAIL "):
            fails.append(body[5:])
        elif body.startswith("UNAME "):
            uname = body[6:]
    return {"cpuinfo": cpuinfo, "replays": replays, "end": end, "fail": fails, "uname": uname}


def cpu_part(cpuinfo: list[str]) -> str:
    """The ``CPU part`` the guest kernel reported (0xd03 A53, 0xd08 A72, 0xd0b A76)."""
    parts = {
        v.strip() for k, _, v in (x.partition(":") for x in cpuinfo) if k.strip() == "CPU part"
    }
    return ",".join(sorted(parts)) or "?"


def wheels_key(litert: str, pyproject: str) -> str:
    """The wheel cache directory's key, computed as ``scripts/test-arm`` does (ai-edge-litert's
    version, the recipe and the optional dependencies of pyproject.toml)."""
    lines = pyproject.splitlines()
    at = next((i for i, x in enumerate(lines) if "optional-dependencies" in x), None)
    if at is None:
        raise VmError("pyproject.toml has no optional-dependencies section")
    grep = "\n".join(lines[at : at + 13])
    return hashlib.sha256(f"{litert}\n{RECIPE}\n{grep}\n".encode()).hexdigest()[:12]


def same_streams(a: Path, b: Path) -> dict[str, list[str]]:
    """Bundles whose streams (``y`` and state) in ``a`` are identical to ``b``'s: {'same': ...,
    'differ': ..., 'missing': ...} (missing: in ``a`` only)."""
    import numpy as np

    out: dict[str, list[str]] = {"same": [], "differ": [], "missing": []}
    for f in sorted(a.glob("*.npz")):
        g = b / f.name
        if not g.exists():
            out["missing"].append(f.stem)
            continue
        with np.load(f) as x, np.load(g) as y:
            equal = all(
                x[k].shape == y[k].shape and bool((x[k] == y[k]).all()) for k in ("y", "state")
            )
        out["same" if equal else "differ"].append(f.stem)
    return out


def user_table(runs: Path, user_runs: Path) -> tuple[str, dict[str, Any]]:
    """The VM's streams against scripts/test-arm's qemu-user streams of the same CPU model."""
    lines = [
        "| qemu -cpu | interpreter | identical to qemu-user (bundles) | differ | not in qemu-user |",
        "| --- | --- | --- | --- | --- |",
    ]
    found: dict[str, Any] = {}
    for vm in sorted(runs.glob("vm-*")):
        cpu = vm.name.removeprefix("vm-")
        for interp in INTERPRETERS:
            r = same_streams(vm / interp, user_runs / cpu / interp)
            found.setdefault(cpu, {})[interp] = r
            lines.append(
                f"| {cpu} | {interp} | {len(r['same'])} | {', '.join(r['differ']) or '-'} | "
                f"{', '.join(r['missing']) or '-'} |"
            )
    return "\n".join(lines), found


def vm_table(vms: dict[str, dict[str, Any]], kernel: str) -> str:
    """One row per VM: what the guest's kernel reported and how long it took."""
    lines = [
        "| qemu -cpu | guest kernel | guest CPU part | VM wall (s) | replay litert / tflite (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cpu, vm in vms.items():
        times = " / ".join(
            f"{vm['replays'][i][1]}" + ("" if vm["replays"][i][0] == 0 else " (failed)")
            if i in vm["replays"]
            else "-"
            for i in INTERPRETERS
        )
        lines.append(
            f"| {cpu} | {vm['uname'] or kernel} | {vm['cpu_part']} | {vm['wall_s']} | {times} |"
        )
    return "\n".join(lines)


# --- I/O ------------------------------------------------------------------------------------


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if r.returncode != 0:
        raise VmError(
            f"{' '.join(map(str, cmd[:3]))} ... failed (exit {r.returncode}): "
            f"{(r.stderr or r.stdout).strip()[-2000:]}"
        )
    return r


def ensure_tools() -> None:
    need = {
        "qemu-system-aarch64": "qemu-system-arm",
        "mkfs.ext4": "e2fsprogs",
        "debugfs": "e2fsprogs",
        "dpkg-deb": "dpkg",
        "apt-get": "apt",
    }
    missing = sorted({pkg for tool, pkg in need.items() if not shutil.which(tool)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise VmError(f"missing {', '.join(missing)}: install them (Debian: apt-get install)")
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def cache_dir() -> Path:
    default = "/var/cache/edge-lstm" if os.geteuid() == 0 else str(Path.home() / ".cache/edge-lstm")
    return Path(os.environ.get("EDGE_LSTM_ARM_CACHE", default))


def arm64_debs(cache: Path) -> Path:
    """linux-image-*-arm64 and busybox-static for arm64, downloaded once with a private apt
    state (the host's dpkg is not told about arm64)."""
    d = cache / "vm-debs"
    if (d / ".done").exists():
        return d
    log(f"downloading Debian's arm64 kernel and busybox-static into {d}")
    shutil.rmtree(d, ignore_errors=True)
    state = d / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True)
    (state / "status").touch()
    opts = [
        "-o",
        "APT::Architecture=arm64",
        "-o",
        "APT::Architectures::=arm64",
        "-o",
        f"Dir::State::Lists={state}/lists",
        "-o",
        f"Dir::Cache={state}/cache",
        "-o",
        f"Dir::State::status={state}/status",
        "-o",
        "Debug::NoLocking=1",
        "-o",
        "APT::Sandbox::User=root",
    ]
    run(["apt-get", *opts, "update", "-qq"])
    dep = run(["apt-cache", *opts, "depends", "linux-image-arm64"]).stdout
    m = re.search(r"Depends: (linux-image-\S+-arm64)", dep)
    if not m:
        raise VmError(f"cannot tell the kernel package linux-image-arm64 depends on: {dep!r}")
    run(["apt-get", *opts, "download", m[1], "busybox-static"], cwd=d)
    (d / ".done").write_text(m[1] + "\n")
    return d


def kernel_and_initrd(cache: Path) -> tuple[Path, Path, str]:
    """(vmlinuz, initrd.gz, kernel release) for the guest, built once per kernel package."""
    debs = arm64_debs(cache)
    pkg = (debs / ".done").read_text().strip()
    out = cache / f"vm-boot-{pkg}"
    kernel, initrd = out / "vmlinuz", out / "initrd.gz"
    if initrd.exists():
        return kernel, initrd, pkg.removeprefix("linux-image-")
    log(f"building the guest's kernel and initrd in {out}")
    with tempfile.TemporaryDirectory(prefix="armvm-deb.") as tmp:
        t = Path(tmp)
        for deb in debs.glob("*.deb"):
            run(["dpkg-deb", "-x", str(deb), str(t)])
        release = next(t.glob("lib/modules/*")).name
        mods = {p.name.removesuffix(".ko"): p for p in (t / "lib/modules" / release).rglob("*.ko")}
        depends = {
            n: [d for d in modinfo(p.read_bytes()).get("depends", "").split(",") if d]
            for n, p in mods.items()
        }
        order = load_order(list(ROOT_MODULES), {n: depends[n] for n in depends})
        busybox = t / "bin/busybox"
        entries: list[tuple[str, int, bytes]] = [
            (d, 0o40755, b"") for d in ("bin", "modules", "proc", "sys", "dev", "newroot")
        ]
        # the kernel opens /dev/console for /init before anything is mounted
        entries.append(("dev/console", 0o20600, b""))
        entries.append(("bin/busybox", 0o100755, busybox.read_bytes()))
        entries += [(f"modules/{n}.ko", 0o100644, mods[n].read_bytes()) for n in order]
        entries.append(("init", 0o100755, init_script(order).encode()))
        tmp_out = out.with_suffix(".tmp")
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        (tmp_out / "initrd.gz").write_bytes(
            gzip.compress(cpio_newc(entries, {"dev/console": (5, 1)}), 6)
        )
        shutil.copy(t / f"boot/vmlinuz-{release}", tmp_out / "vmlinuz")
        (tmp_out / "modules.txt").write_text("\n".join(order) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp_out.rename(out)
    return kernel, initrd, pkg.removeprefix("linux-image-")


def venv_python(name: str) -> str:
    return str(ROOT / name / "bin" / "python")


def x86_reference(bundles: Path, work: Path, runs: Path, steps: int) -> None:
    """Inputs and the x86 streams in both interpreters, as scripts/test-arm makes them."""
    log("x86 reference: closed-loop streams of every test bundle")
    py = venv_python(".venv")
    run(
        [
            py,
            "-m",
            "tests.arm_check",
            "inputs",
            str(bundles),
            str(work / "in"),
            "--steps",
            str(steps),
        ],
        cwd=ROOT,
    )
    device_env = {**os.environ, "EDGE_LSTM_DEVICE_PYTHON": "", "PYTHONPATH": str(ROOT)}
    for backend, python, env in (
        ("litert", py, None),
        ("tflite", venv_python(".venv-device"), device_env),
    ):
        out = runs / "x86_64" / backend
        replay = ["-m", "tests.arm_check", "replay", str(bundles), str(work / "in"), str(out)]
        run([python, *replay, "--backend", backend], cwd=ROOT, env=env)


def disk_image(rootfs: Path, wheels: Path, bundles: Path, work: Path) -> Path:
    """An ext4 image of a copy of the cached root file system plus everything the guest needs."""
    stage = work / "stage"
    log(f"staging a copy of {rootfs} with the wheels, this project's wheel and the bundles")
    run(["cp", "-a", f"{rootfs}/.", str(stage)])
    for sub in INTERPRETERS:
        run(["cp", "-a", str(wheels / sub), str(stage / "opt/wheels" / sub)])
    proj = stage / "opt/edge-lstm"
    run(
        [
            venv_python(".venv"),
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(work / "dist"),
            str(ROOT),
        ]
    )
    run(
        [
            venv_python(".venv"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(proj / "project"),
            *map(str, (work / "dist").glob("*.whl")),
        ]
    )
    (proj / "src").mkdir()
    shutil.copytree(
        ROOT / "tests", proj / "src/tests", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(work / "in", proj / "in")
    shutil.copytree(bundles, stage / "opt/bundles")
    (stage / "opt/out").mkdir()
    size_mb = int(run(["du", "-sm", str(stage)]).stdout.split()[0]) + 768
    img = work / "disk.img"
    run(["mkfs.ext4", "-q", "-F", "-L", "armvm", "-d", str(stage), str(img), f"{size_mb}M"])
    shutil.rmtree(stage)
    return img


def boot(
    cpu: str, kernel: Path, initrd: Path, img: Path, console: Path, smp: int, timeout: float
) -> float:
    """Boot the guest once; returns the wall time. Killed (VmError) after ``timeout``."""
    cmd = [
        "nice",
        "-n",
        "10",
        "qemu-system-aarch64",
        "-M",
        "virt",
        "-cpu",
        cpu,
        "-m",
        "2G",
        "-smp",
        str(smp),
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"console=ttyAMA0 rdinit=/init panic=-1 loglevel=4 armvm_cpu={cpu}",
        "-drive",
        f"file={img},format=raw,if=none,id=hd0",
        "-device",
        "virtio-blk-device,drive=hd0",
    ]
    log(f"{cpu}: booting ({' '.join(cmd[3:])})")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        tail = console.read_text(errors="replace").splitlines()[-15:] if console.exists() else []
        tail = tail or ["(none)"]
        raise VmError(
            f"{cpu}: the VM did not power off within {timeout:.0f} s (killed); "
            "last console lines:\n" + "\n".join(tail)
        ) from None
    if proc.returncode != 0:
        raise VmError(f"{cpu}: qemu-system-aarch64 exited {proc.returncode}: {out.strip()}")
    return time.monotonic() - t0


def read_back(img: Path, cpu: str, dest: Path) -> None:
    """The guest's results out of the image, without mounting it."""
    dest.mkdir(parents=True, exist_ok=True)
    r = run(["debugfs", "-R", f"rdump /opt/out/{cpu} {dest}", str(img)])
    if not (dest / cpu).is_dir():
        raise VmError(f"{cpu}: no results in the disk image ({r.stderr.strip()})")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cpus",
        default=",".join(DEFAULT_CPUS),
        help="qemu CPU models, comma-separated (default %(default)s)",
    )
    ap.add_argument("--steps", type=int, default=2000, help="closed-loop steps per stream")
    ap.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds before a VM that has not powered off is killed",
    )
    ap.add_argument("--smp", type=int, default=2, help="guest CPUs (the replays run in parallel)")
    ap.add_argument("--bundles", type=Path, default=ROOT / "build/test-bundles")
    ap.add_argument("--out", type=Path, default=BUILD / "arm_vm")
    ap.add_argument(
        "--user-runs",
        type=Path,
        default=ROOT / "build/arm/runs",
        help="scripts/test-arm's streams (qemu-user) to compare the VM's with, if present "
        "(default %(default)s)",
    )
    args = ap.parse_args()
    cpus = [c for c in args.cpus.split(",") if c]
    if not cpus or args.steps < 1 or args.timeout <= 0 or args.smp < 1:
        ap.error("--cpus must name a CPU model; --steps, --timeout and --smp must be positive")
    if not (args.bundles / "complete").exists():
        ap.error(f"no test bundles in {args.bundles}: run scripts/test first")
    try:
        return check(args, cpus)
    except VmError as e:
        print(f"bench.arm_vm: error: {e}", file=sys.stderr)
        return 1


def check(args: argparse.Namespace, cpus: list[str]) -> int:
    t_start = time.monotonic()
    cache = cache_dir()
    rootfs = cache / f"arm64-bookworm-r{RECIPE}"
    litert = run(
        [
            venv_python(".venv"),
            "-c",
            "from importlib.metadata import version; print(version('ai-edge-litert'))",
        ]
    ).stdout.strip()
    wheels = cache / f"arm64-wheels-{wheels_key(litert, (ROOT / 'pyproject.toml').read_text())}"
    for need in (rootfs / "usr/bin/python3", wheels / "litert/.done", wheels / "tflite/.done"):
        if not need.exists():
            raise VmError(f"{need} missing: run scripts/test-arm first (it builds the cache)")
    ensure_tools()
    kernel, initrd, kernel_pkg = kernel_and_initrd(cache)
    shutil.rmtree(args.out, ignore_errors=True)
    runs = args.out / "runs"
    report: dict[str, object] = {
        "kernel": kernel_pkg,
        "steps": args.steps,
        "smp": args.smp,
        "qemu": run(["qemu-system-aarch64", "--version"]).stdout.splitlines()[0],
        "vms": {},
    }
    with tempfile.TemporaryDirectory(prefix="armvm.") as tmp:
        work = Path(tmp)
        x86_reference(args.bundles, work, runs, args.steps)
        img = disk_image(rootfs, wheels, args.bundles, work)
        problems: list[str] = []
        for cpu in cpus:
            console = args.out / f"console-{cpu}.log"
            args.out.mkdir(parents=True, exist_ok=True)
            try:
                wall = boot(cpu, kernel, initrd, img, console, args.smp, args.timeout)
            except VmError as e:
                problems.append(str(e))
                log(str(e))
                continue
            seen = parse_console(console.read_text(errors="replace"))
            replays = seen["replays"]
            assert isinstance(replays, dict)
            cpuinfo = seen["cpuinfo"]
            assert isinstance(cpuinfo, list)
            vm = {
                "wall_s": round(wall),
                "cpu_part": cpu_part(cpuinfo),
                "uname": seen["uname"],
                "replays": replays,
                "fail": seen["fail"],
            }
            report["vms"][cpu] = vm  # type: ignore[index]
            log(
                f"{cpu}: powered off after {wall:.0f} s; guest CPU part {vm['cpu_part']}, "
                f"replays {replays}"
            )
            bad = [f"{i} exit {rc}" for i, (rc, _) in replays.items() if rc != 0]
            bad += [f"{i} did not report" for i in INTERPRETERS if i not in replays]
            if seen["fail"] or seen["end"] is None or bad:
                problems.append(
                    f"{cpu}: guest failed: {seen['fail'] or bad or 'no END line'} "
                    f"(console: {console})"
                )
                if not replays:
                    continue
            dump = work / f"dump-{cpu}"
            read_back(img, cpu, dump)
            shutil.copytree(dump / cpu, runs / f"vm-{cpu}")
        # compare() takes every machine directory beside x86_64; logs and cpuinfo stay beside.
        for d in runs.glob("vm-*"):
            for f in [*d.glob("*.log"), d / "cpuinfo"]:
                if f.exists():
                    f.rename(args.out / f"{d.name}-{f.name}")
    rc = 0
    if any(runs.glob("vm-*")):
        r = subprocess.run(
            [
                venv_python(".venv"),
                "-m",
                "tests.arm_check",
                "compare",
                str(runs),
                str(args.out / "table.json"),
            ],
            cwd=ROOT,
            text=True,
            capture_output=True,
        )
        rc = r.returncode
        print(r.stdout, end="")
        print(r.stderr, end="", file=sys.stderr)
    vms = report["vms"]
    assert isinstance(vms, dict)
    print(vm_table(vms, kernel_pkg))
    if args.user_runs.is_dir() and any(runs.glob("vm-*")):
        text, found = user_table(runs, args.user_runs)
        report["vs_qemu_user"] = {"runs": str(args.user_runs), **found}
        print(f"\nVM streams vs scripts/test-arm's qemu-user streams ({args.user_runs}):")
        print(text)
    report["wall_s"] = round(time.monotonic() - t_start)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"VM check done in {report['wall_s']} s; results in {args.out}")
    for p in problems:
        print(f"bench.arm_vm: {p}", file=sys.stderr)
    return 1 if problems or rc != 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
