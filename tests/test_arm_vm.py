"""The full-system Arm bench's pure parts: the cache key it shares with scripts/test-arm, the
module load order, the initrd archive, the guest's /init and the console it reads back."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bench import arm_vm

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_cache_key_is_the_one_scripts_test_arm_computes() -> None:
    script = (ROOT / "scripts/test-arm").read_text()
    recipe = re.search(r"^RECIPE=(\d+)", script, re.M)
    assert recipe and int(recipe[1]) == arm_vm.RECIPE
    line = next(x for x in script.splitlines() if x.startswith("WHEELS="))
    got = subprocess.run(
        ["bash", "-c", f'LITERT=9.8.7 CACHE=/c RECIPE={recipe[1]}; {line}; echo "$WHEELS"'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    key = arm_vm.wheels_key("9.8.7", (ROOT / "pyproject.toml").read_text())
    assert got == f"/c/arm64-wheels-{key}"


def test_load_order_puts_dependencies_first_and_names_what_is_missing() -> None:
    deps = {"ext4": ["jbd2", "mbcache", "crc16"], "jbd2": [], "mbcache": [], "crc16": []}
    deps["virtio_blk"] = []
    order = arm_vm.load_order(["virtio_blk", "ext4"], deps)
    assert order == ["virtio_blk", "jbd2", "mbcache", "crc16", "ext4"]
    with pytest.raises(arm_vm.VmError, match=r"'crc16' \(needed by ext4\)"):
        arm_vm.load_order(["ext4"], {k: v for k, v in deps.items() if k != "crc16"})


def test_cpio_archive_has_aligned_newc_headers_and_device_numbers() -> None:
    data = arm_vm.cpio_newc(
        [("bin", 0o40755, b""), ("bin/x", 0o100755, b"abcde"), ("dev/console", 0o20600, b"")],
        {"dev/console": (5, 1)},
    )
    seen = {}
    at = 0
    while True:
        head = data[at : at + 110]
        assert head[:6] == b"070701"
        f = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        name = data[at + 110 : at + 110 + f[11] - 1].decode()
        at += 110 + f[11]
        at += -at % 4
        body = data[at : at + f[6]]
        at += f[6] + (-f[6] % 4)
        if name == "TRAILER!!!":
            break
        seen[name] = (f[1], body, f[9], f[10])
    assert at == len(data)
    assert seen == {
        "bin": (0o40755, b"", 0, 0),
        "bin/x": (0o100755, b"abcde", 0, 0),
        "dev/console": (0o20600, b"", 5, 1),
    }


def test_guest_init_is_valid_shell_that_loads_modules_in_order() -> None:
    script = arm_vm.init_script(["virtio_mmio", "ext4"])
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)
    assert "for m in virtio_mmio ext4; do" in script
    assert script.rstrip().endswith("finish 0")


def test_console_parsing_takes_only_marked_lines() -> None:
    text = (
        "[    1.0] random: crng init done\r\n"
        "ARMVM | CPU part\t: 0xd08\r\n"
        "ARMVM | CPU part\t: 0xd08\n"
        "[    9.1] virtio_blk virtio0: [vda] 1 512-byte logical blocks\n"
        "ARMVM REPLAY litert rc=0 seconds=12\n"
        "ARMVM tflite: clf-int8: tflite-2.14-builtin-aarch64\n"
        "ARMVM REPLAY tflite rc=1 seconds=3\n"
        "ARMVM FAIL insmod ext4\n"
        "ARMVM UNAME 6.1.0-57-arm64 aarch64\n"
        "ARMVM END 0\n"
    )
    seen = arm_vm.parse_console(text)
    assert seen["replays"] == {"litert": (0, 12), "tflite": (1, 3)}
    assert seen["end"] == 0 and seen["fail"] == ["insmod ext4"]
    assert seen["uname"] == "6.1.0-57-arm64 aarch64"
    assert isinstance(seen["cpuinfo"], list)
    assert arm_vm.cpu_part(seen["cpuinfo"]) == "0xd08"
    assert arm_vm.parse_console("kernel panic\n")["end"] is None


def test_same_streams_tells_identical_differing_and_missing_bundles(tmp_path: Path) -> None:
    import numpy as np

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    y, state = np.arange(6, dtype=np.int8).reshape(2, 3), np.zeros((2, 3, 4), np.int8)
    for d in (a, b):
        np.savez(d / "same.npz", y=y, state=state)
    np.savez(a / "differ.npz", y=y, state=state)
    changed = state.copy()
    changed[1, 2, 3] = 1
    np.savez(b / "differ.npz", y=y, state=changed)
    np.savez(a / "only-a.npz", y=y, state=state)
    assert arm_vm.same_streams(a, b) == {
        "same": ["same"],
        "differ": ["differ"],
        "missing": ["only-a"],
    }
