"""What a first user meets before anything streams: versions, licence files, the deploy kit,
one-line messages for missing optional dependencies, and one reorder default everywhere."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from edge import config
from edge._version import __version__

ROOT = Path(__file__).resolve().parent.parent
CLIS = {"edge-lstm": "edge.cli", "lstm-convert": "convert.cli", "firmware-sim": "firmware_sim.cli"}


def run_cli(
    module: str, argv: list[str], block: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run a CLI's main() in a fresh interpreter, with some modules made unimportable (as on
    a machine where they are not installed)."""
    code = (
        "import sys\n"
        f"for m in {list(block)!r}: sys.modules[m] = None\n"
        f"from {module} import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_every_cli_reports_the_installed_version(prog):
    out = run_cli(CLIS[prog], ["--version"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{prog} {metadata.version('edge-lstm')}"
    # one place: the metadata comes from edge/_version.py
    assert metadata.version("edge-lstm") == __version__


def test_version_is_written_in_one_place():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and "edge._version.__version__" in text
    hits = [
        p.relative_to(ROOT)
        for pkg in ("edge", "convert", "firmware_sim")
        for p in (ROOT / pkg).rglob("*.py")
        if re.search(r"^__version__ = ", p.read_text(), re.M)
    ]
    assert hits == [Path("edge/_version.py")]


def test_licence_notice_and_changelog():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert "Version 2.0" in (ROOT / "LICENSE").read_text()
    notice = (ROOT / "NOTICE").read_text()
    assert "BasicMotions" in notice and "UEA" in notice and "BSD" in notice
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "Keep a Changelog" in changelog
    # a development version's changes are the Unreleased section; a release has its own
    section = "Unreleased" if ".dev" in __version__ else __version__
    assert f"## [{section}]" in changelog, section


def test_one_reorder_default_everywhere():
    from bench.chaos import parser as chaos_parser
    from firmware_sim.runtime import Runtime

    default = config.ServiceConfig().reorder_ms
    assert default == config.REORDER_MS_DEFAULT > 0
    # the demo, firmware-sim and the tests run serve with its own default
    cmd = Runtime(Path("b"), "mqtt://127.0.0.1:1", Path("s")).cmd
    assert "--reorder-ms" not in cmd
    assert chaos_parser().parse_args(["--bundle", "b"]).reorder_ms == default
    readme = (ROOT / "README.md").read_text()
    assert f"reorder_ms` defaults to {default:g} ms" in readme


@pytest.mark.parametrize(
    "argv",
    [
        ["train-example", "--out", "{tmp}/out/m.keras"],
        ["convert", "{tmp}/m.keras", "--calib", "{tmp}/c.npy", "--out", "{tmp}/out/b"],
    ],
)
def test_converter_without_tensorflow_says_what_to_install(tmp_path, argv):
    """As on a device install: no TensorFlow, no Keras; one line, exit 2, nothing written."""
    import numpy as np

    (tmp_path / "m.keras").write_bytes(b"PK")
    np.save(tmp_path / "c.npy", np.zeros((2, 5, 3), np.float32))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = run_cli("convert.cli", argv, block=("keras", "tensorflow"))
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert err[-1].startswith("lstm-convert: error: this needs ")
    assert err[-1].endswith("pip install 'edge-lstm[convert]'")
    assert len([line for line in err if "error" in line]) == 1, out.stderr
    assert not (tmp_path / "out").exists()


def test_worker_without_nats_py_says_to_install_the_cluster_extra(bundles, tmp_path):
    """As on a device install with [tflite,service] only: one line, exit 2, no traceback."""
    argv = ["worker", "--model", str(bundles / "clf-int8"), "--nats", "nats://127.0.0.1:1"]
    argv += ["--state-dir", str(tmp_path / "state")]
    out = run_cli("edge.cli", argv, block=("nats",))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    err = out.stderr.strip().splitlines()
    assert err[-1] == (
        "edge-lstm: error: this needs nats, which is not installed here: "
        "pip install 'edge-lstm[cluster]'"
    ), out.stderr


def test_deploy_kits_next_steps_make_everything_its_files_expect(tmp_path):
    """What the unit and the configurations expect but the kit does not write (the service's
    user, the bundle, the password files, the certificates) is in the printed steps: without
    them `systemctl enable --now edge-lstm` fails on a fresh device."""
    import configparser

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    out = run_cli("edge.cli", ["deploy-kit", str(tmp_path / "kit")])
    assert out.returncode == 0, out.stderr
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "edge" / "deploy" / "edge-lstm.service")
    assert re.search(rf"^\s*useradd .*\b{unit['Service']['User']}\b", out.stdout, re.M)
    serve = tomllib.loads((ROOT / "edge" / "deploy" / "edge-lstm.toml").read_text())["serve"]
    for key in ("model", "password_file", "tls_ca"):
        assert serve[key] in out.stdout, key
    mosquitto = (ROOT / "edge" / "deploy" / "mosquitto.conf").read_text()
    for key in ("password_file", "certfile", "keyfile"):
        value = re.search(rf"^{key} (\S+)", mosquitto, re.M).group(1)
        assert Path(value).name in out.stdout and str(Path(value).parent) in out.stdout, key


def test_deploy_kits_next_steps_say_where_each_file_goes(tmp_path):
    """The help and the README say the kit prints where each file goes; the worker's unit,
    nats-server.conf and the Grafana dashboard were written and never mentioned again."""
    kit = tmp_path / "kit"
    out = run_cli("edge.cli", ["deploy-kit", str(kit)])
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stdout.splitlines() if not line.startswith("wrote ")]
    for name in sorted(p.name for p in kit.iterdir()):
        assert any(f"{kit}/{name}" in line for line in steps), name


def test_deploy_kits_next_steps_run_as_printed_from_a_directory_with_a_space(tmp_path):
    """The steps are commands to paste into a shell: the kit's directory was printed as it
    was, and `install -m 644 /tmp/my kit/mosquitto.conf /etc/...` split it in two (install:
    target '/etc/mosquitto/conf.d/edge-lstm.conf' is not a directory)."""
    import shlex

    kit = tmp_path / "my kit's"
    out = run_cli("edge.cli", ["deploy-kit", str(kit)])
    assert out.returncode == 0, out.stderr
    installs = [
        shlex.split(line.strip().lstrip("#").strip())
        for line in out.stdout.splitlines()
        if line.strip().lstrip("#").strip().startswith("install ")
    ]
    assert len(installs) == 6, out.stdout
    for argv in installs:
        assert (kit / Path(argv[-2]).name).is_file() and Path(argv[-2]).parent == kit, argv


def test_every_module_path_and_name_the_docs_cite_exists():
    """`edge/x.py`, `edge.module.Name`, `bench.name`: a reader looks them up."""
    import importlib

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(p.read_text() for p in docs)
    paths = set(re.findall(r"`((?:edge|convert|firmware_sim|bench|tests|scripts)/[\w./-]+)`", text))
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    for name in sorted(set(re.findall(r"`((?:edge|convert|firmware_sim|bench)(?:\.\w+)+)`", text))):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                obj = getattr(obj, attr, None)
            if obj is None:
                missing.append(name)
            break
    assert not missing, missing


def test_the_readmes_python_api_example_runs_as_written(bundles, tmp_path, monkeypatch):
    import numpy as np

    readme = (ROOT / "README.md").read_text()
    code = readme.split("Python API:\n\n```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"bundle/"', repr(str(bundles / "clf-int8")))
    monkeypatch.chdir(tmp_path)  # it writes state.bin
    rows = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    exec(
        compile(code, "README.md", "exec"),
        {"x": rows[0], "x1": rows[1], "x2": rows[2:3], "xs": rows[3:]},
    )
    assert (tmp_path / "state.bin").is_file()


@pytest.mark.parametrize(
    "prog, argv",
    [
        ("edge-lstm", ["serve", "--durability", "bogus"]),
        ("edge-lstm", ["inspect"]),
        ("lstm-convert", ["convert", "m.keras", "--bogus"]),
        ("firmware-sim", ["run", "--broker", "mqtt://127.0.0.1:1", "--devices", "x"]),
    ],
)
def test_a_bad_option_is_usage_then_one_error_line_and_exit_2(prog, argv):
    out = run_cli(CLIS[prog], argv)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert err[0].startswith("usage: ") and err[-1].startswith(f"{prog} {argv[0]}: error: ")
    assert len([line for line in err if ": error: " in line]) == 1, out.stderr


@pytest.mark.desktop
def test_the_sdist_holds_every_file_the_docs_link_to(tmp_path):
    """The source release is read without the repository: README's links to docs/ must work."""
    import tarfile

    out = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), "."],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        held = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    linked = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            path = (doc.parent / target).resolve().relative_to(ROOT)
            linked |= {str(path), str(doc.relative_to(ROOT))}
    assert linked and not sorted(linked - held), sorted(linked - held)


def test_lstm_converts_help_names_what_its_text_names_and_says_the_exit_codes():
    def help_of(command: str) -> str:
        out = run_cli("convert.cli", [command, "--help"])
        assert out.returncode == 0, out.stderr
        return " ".join(out.stdout.split())

    convert = help_of("convert")  # "Convert MODEL (.keras or .onnx) into DIR ..."
    assert "--out DIR" in convert and convert.split(" [-h]")[1].split(" Convert ")[0].endswith(
        "MODEL"
    )
    assert "earlier bundle" in convert and "2 bad input" in convert
    verify = help_of("verify")  # "... checks on DIR"
    assert "[--json] DIR" in verify and "2 bad input" in verify
    assert "bundle was written" not in verify  # verify writes none
    assert "--out MODEL.keras" in help_of("train-example")  # "writes MODEL.keras, ..."


def test_the_worker_toml_of_docs_cluster_is_what_the_worker_reads(tmp_path):
    from edge.worker_cli import _worker_table

    doc = (ROOT / "docs" / "cluster.md").read_text()
    (toml,) = re.findall(r"```toml\n(.*?)```", doc, re.S)
    unit = (ROOT / "edge" / "deploy" / "edge-lstm-worker.service").read_text()
    assert "--config /etc/edge-lstm/worker.toml" in unit and "/etc/edge-lstm/worker.toml" in doc
    (tmp_path / "worker.toml").write_text(toml)
    worker = _worker_table(config.read_toml(tmp_path / "worker.toml"), "worker.toml")
    cfg = config.load(tmp_path / "worker.toml", env={})
    assert cfg.model == "/opt/edge-lstm/bundle" and cfg.reorder_ms == 600
    assert worker["nats"].count("nats://") == 3 and worker["replicas"] == 3


def test_the_demo_without_a_cache_or_the_converter_says_both_in_one_line(tmp_path, monkeypatch):
    """On a device install: nothing cached, no Keras. Not "first run: training ..." first."""
    monkeypatch.setenv("EDGE_LSTM_CACHE", str(tmp_path / "cache"))
    out = run_cli("firmware_sim.cli", ["demo", "--duration", "1"], block=("keras", "tensorflow"))
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(err) == 1 and "no cached bundle in" in err[0], out.stderr
    assert err[0].endswith("pip install 'edge-lstm[convert]'")


def test_a_workers_environment_wins_over_its_file_as_serves_does(tmp_path, monkeypatch):
    import edge.nats_worker
    from edge.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def fake_worker(cfg, opts):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(edge.nats_worker, "Worker", fake_worker)
    (tmp_path / "w.toml").write_text('model = "m"\nreorder_ms = 600\nmax_batch = 64\n')
    monkeypatch.setenv("EDGE_LSTM_REORDER_MS", "100")
    monkeypatch.setenv("EDGE_LSTM_MODEL", "from-env")
    with pytest.raises(Stop):
        main(["worker", "--config", str(tmp_path / "w.toml"), "--nats", "nats://127.0.0.1:1"])
    assert seen["cfg"].reorder_ms == 100 and seen["cfg"].max_batch == 64  # env, then the file
    assert seen["cfg"].model == "from-env"
    seen.clear()
    with pytest.raises(Stop):
        main(
            [
                "worker",
                "--config",
                str(tmp_path / "w.toml"),
                "--nats",
                "nats://127.0.0.1:1",
                "--model",
                "cli",
            ]
        )
    assert seen["cfg"].model == "cli"  # the command line over both


def test_the_git_url_install_names_the_tag_the_release_steps_make():
    readme = (ROOT / "README.md").read_text()
    assert f"edge-lstm.git@v{__version__}'" in readme
    assert f"`git tag v{__version__}`" in readme.split("## Releasing", 1)[1]


def test_the_demo_refuses_reboots_without_boot_ids_naming_what_it_takes(tmp_path, monkeypatch):
    """The demo has no --restart-gap: its refusal must not ask for one."""
    monkeypatch.setenv("EDGE_LSTM_CACHE", str(tmp_path / "cache"))
    argv = ["demo", "--no-boot-ids", "--faults", "reboot=0.01", "--duration", "1"]
    out = run_cli("firmware_sim.cli", argv)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert "drop --no-boot-ids" in err[0] and "firmware-sim run --restart-gap" in err[0]
    assert not (tmp_path / "cache").exists()  # refused before anything else


def test_the_readme_says_where_serve_keeps_its_state_and_which_client_id_it_uses():
    import socket
    from dataclasses import replace

    readme = " ".join((ROOT / "README.md").read_text().split())
    cfg = config.ServiceConfig()
    assert f"(`{cfg.state_dir}` in the current directory unless set;" in readme
    model = str(ROOT)  # validate wants one; the client id is what is read here
    assert (
        config.validate(replace(cfg, model=model)).client_id == f"edge-lstm-{socket.gethostname()}"
    )
    assert "connects as client id `edge-lstm-HOSTNAME`" in readme


def test_deploy_kit_writes_the_shipped_files_and_never_clobbers(tmp_path):
    target = tmp_path / "kit"
    out = run_cli("edge.cli", ["deploy-kit", str(target)])
    assert out.returncode == 0, out.stderr
    shipped = sorted(p.name for p in (ROOT / "edge" / "deploy").iterdir() if p.is_file())
    assert sorted(p.name for p in target.iterdir()) == shipped
    for name in shipped:
        assert (target / name).read_bytes() == (ROOT / "edge" / "deploy" / name).read_bytes()
    assert {"edge-lstm.service", "mosquitto.conf", "edge-lstm.acl", "edge-lstm.toml"} <= set(
        shipped
    )
    assert "systemctl" in out.stdout
    (target / "edge-lstm.toml").write_text("# mine\n")
    again = run_cli("edge.cli", ["deploy-kit", str(target)])
    err = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(err) == 1 and "--force" in err[0]
    assert (target / "edge-lstm.toml").read_text() == "# mine\n"
    forced = run_cli("edge.cli", ["deploy-kit", str(target), "--force"])
    assert forced.returncode == 0
    assert (target / "edge-lstm.toml").read_bytes() == (
        ROOT / "edge/deploy/edge-lstm.toml"
    ).read_bytes()
    on_a_file = run_cli("edge.cli", ["deploy-kit", str(target / "edge-lstm.toml")])
    assert on_a_file.returncode == 2 and "not a directory" in on_a_file.stderr


def test_deploy_kit_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "kit"
    (target / "mosquitto.conf").mkdir(parents=True)
    forced = run_cli("edge.cli", ["deploy-kit", str(target), "--force"])
    err = forced.stderr.strip().splitlines()
    assert forced.returncode == 2
    assert [p.name for p in target.iterdir()] == ["mosquitto.conf"]  # nothing else written
    assert len(err) == 1 and f"{target / 'mosquitto.conf'} is a directory" in err[0], err
    assert not any((target / "mosquitto.conf").iterdir())

    (target / "mosquitto.conf").rmdir()
    assert run_cli("edge.cli", ["deploy-kit", str(target)]).returncode == 0
    kit = sorted(p.name for p in target.iterdir())
    (target / "edge-lstm.toml").write_text("# mine\n")
    (target / "edge-lstm.service").unlink()
    os.mkfifo(target / "edge-lstm.service")
    for force in ([], ["--force"]):
        again = run_cli("edge.cli", ["deploy-kit", str(target), *force])
        err = again.stderr.strip().splitlines()
        assert again.returncode == 2 and len(err) == 1, again.stderr
        assert f"{target / 'edge-lstm.service'} is a FIFO" in err[0]
        assert (target / "edge-lstm.toml").read_text() == "# mine\n"
        assert stat.S_ISFIFO((target / "edge-lstm.service").lstat().st_mode)
        assert sorted(p.name for p in target.iterdir()) == kit  # no temporary file left


def test_deploy_kits_help_names_every_file_it_writes_and_what_a_second_run_does(tmp_path):
    """The help named three of the seven files the kit writes, and said "Existing files are
    left alone unless --force": run again to add the files a newer kit has, it wrote none
    and exited 2."""
    from edge.deploy_kit import kit_files

    out = run_cli("edge.cli", ["deploy-kit", "--help"])
    assert out.returncode == 0, out.stderr
    for name in kit_files():
        assert re.search(rf"^\s+{re.escape(name)}\s", out.stdout, re.M), name
    kit = tmp_path / "kit"
    assert run_cli("edge.cli", ["deploy-kit", str(kit)]).returncode == 0
    (kit / "nats-server.conf").unlink()  # a kit written before this file was part of it
    again = run_cli("edge.cli", ["deploy-kit", str(kit)])
    assert again.returncode == 2 and not (kit / "nats-server.conf").exists()
    said = " ".join(out.stdout.split())
    assert "refused (exit 2, nothing written) unless --force" in said, out.stdout


def test_deploy_kit_on_a_full_disk_leaves_no_directory_it_made(small_disk):
    """Written whole or not at all: on a full disk the kit's directory was taken away again,
    but the parents it had made for it (`deploy-kit /srv/kits/edge/v2`) were left behind."""
    from tests.conftest import fill

    fill(small_disk / "filler")
    out = run_cli("edge.cli", ["deploy-kit", str(small_disk / "kits" / "edge" / "v2")])
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert "No space left on device" in err[0] and str(small_disk / "kits") in err[0]
    assert [p.name for p in small_disk.iterdir()] == ["filler"]


def test_deploy_kit_follows_a_link_and_keeps_it(tmp_path):
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    (elsewhere / "edge-lstm.toml").write_text("# mine\n")
    target = tmp_path / "kit"
    target.mkdir()
    (target / "edge-lstm.toml").symlink_to(elsewhere / "edge-lstm.toml")
    again = run_cli("edge.cli", ["deploy-kit", str(target)])
    assert again.returncode == 2 and "--force" in again.stderr
    assert [p.name for p in target.iterdir()] == ["edge-lstm.toml"]
    forced = run_cli("edge.cli", ["deploy-kit", str(target), "--force"])
    assert forced.returncode == 0, forced.stderr
    assert (target / "edge-lstm.toml").is_symlink()
    shipped = (ROOT / "edge/deploy/edge-lstm.toml").read_bytes()
    assert (elsewhere / "edge-lstm.toml").read_bytes() == shipped
    assert [p.name for p in elsewhere.iterdir()] == ["edge-lstm.toml"]


def _an_old_kit(target: Path) -> dict[str, bytes]:
    from edge.deploy_kit import kit_files, write_kit

    write_kit(target)
    old = {name: b"# old " + name.encode() + b"\n" for name in kit_files()}
    for name, content in old.items():
        (target / name).write_bytes(content)
    return old


def test_deploy_kit_force_interrupted_mid_replace_leaves_one_whole_kit(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (which ``edge-lstm`` turns into the same interrupt) arriving while
    ``--force`` renames the new files over the old ones: the kit on disk is the new one
    whole, never part old and part new."""
    import signal

    from edge import cli, deploy_kit

    target = tmp_path / "kit"
    _an_old_kit(target)
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the interrupt, during the first rename
        real_replace(src, dst)

    monkeypatch.setattr(deploy_kit.os, "replace", replace)
    with cli.sigterm_interrupts(), pytest.raises(KeyboardInterrupt):
        deploy_kit.write_kit(target, force=True)
    new = deploy_kit.kit_files()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == new  # no temporary file left


def test_deploy_kit_force_puts_the_old_files_back_when_a_rename_fails(tmp_path, monkeypatch):
    from edge import deploy_kit
    from edge.errors import ConfigError

    target = tmp_path / "kit"
    old = _an_old_kit(target)
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == 3:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(deploy_kit.os, "replace", replace)
    with pytest.raises(ConfigError, match="No space left on device") as err:
        deploy_kit.write_kit(target, force=True)
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == old
