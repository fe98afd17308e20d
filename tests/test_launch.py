"""Launch scripts: dry runs print the exact gcloud/ssh commands; remote command lines survive a shell."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu.sh"
GPU = REPO / "launch" / "gpu_multinode.sh"
SCRIPTS = sorted((REPO / "launch").glob("*.sh"))


def script(path: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env or {})
    proc = subprocess.run(["bash", str(path), *args], capture_output=True, text=True, cwd=REPO, env=full_env)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry(path: Path, *args: str, env: dict | None = None) -> list[list[str]]:
    """The commands a dry run prints, each split back into its arguments."""
    out = script(path, *args, "--dry-run", env=env).stdout
    lines = out.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), out
    return [shlex.split(line[2:]) for line in lines]


def remote_command(argv: list[str]) -> str:
    """The --command value of a `gcloud ... ssh` invocation."""
    return argv[argv.index("--command") + 1]


def stub_python(tmp_path: Path) -> Path:
    """A stand-in interpreter that prints each argument on its own line."""
    stub = tmp_path / "fake-python"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    return stub


def test_tpu_create_vm_and_queued_resource():
    [vm] = dry(TPU, "create", "--name", "bpo", "--zone", "us-west4-a", "--project", "proj", "--accelerator-type", "v5litepod-8")
    assert vm == ["gcloud", "compute", "tpus", "tpu-vm", "create", "bpo", "--accelerator-type=v5litepod-8",
                  "--version=v2-alpha-tpuv5-lite", "--zone=us-west4-a", "--project=proj"]
    [queued] = dry(TPU, "create", "--name", "big", "--accelerator-type", "v5p-64", "--queued", "--spot")
    assert queued == ["gcloud", "compute", "tpus", "queued-resources", "create", "big", "--node-id=big",
                      "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--spot"]
    [custom] = dry(TPU, "create", "--name", "x", "--accelerator-type", "v9-1", "--version", "my-runtime")
    assert "--version=my-runtime" in custom


INSTALL = [
    "export", 'PATH=$HOME/.local/bin:$PATH', "&&", "cd", "bpo_jax",
    "&&", "{", "command", "-v", "uv", ">/dev/null", "||", "curl", "-LsSf", "https://astral.sh/uv/install.sh", "|", "sh;", "}",
    "&&", "{", ".venv/bin/python", "-c", "import sys; sys.exit(sys.version_info[:2] < (3, 11))", "2>/dev/null",
    "||", "uv", "venv", "--clear", "--python", "3.11", ".venv;", "}",
    "&&", "uv", "pip", "install", "--quiet", "--python", ".venv/bin/python", "-e", ".", "jax[tpu]",
]


def test_tpu_setup_copies_checkout_and_installs_on_all_workers(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).write_text("{}")
    cmds = dry(TPU, "setup", "--name", "bpo", "--zone", "z", "--copy", f"{model}:/mnt/models/m",
               "--copy", f"{model / 'config.json'}:/mnt/extra/c.json")
    tar, upload, unpack, cleanup, prepare, copy, prepare_file, copy_file, install = cmds
    assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(REPO), "."]
    assert {"--exclude=./.git", "--exclude=./.venv", "--exclude=./runs"} <= set(tar)
    assert upload[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and upload[5] == tar[2]
    # A directory's files go into DEST (a rerun overwrites them, never nests a second copy); DEST is
    # made first, writable by the login user. A file goes to DEST, after its directory is made.
    assert copy[5:9] == ["--recurse", str(model / "config.json"), str(model / "model.safetensors"), "bpo:/mnt/models/m/"]
    assert "/mnt/models/m" in remote_command(prepare) and "sudo chown" in remote_command(prepare)
    assert copy_file[5:7] == [str(model / "config.json"), "bpo:/mnt/extra/c.json"]
    assert shlex.split(remote_command(prepare_file))[:3] == ["{", "mkdir", "-p"] and "/mnt/extra" in remote_command(prepare_file)
    for cmd in (upload, unpack, prepare, copy, copy_file, install):
        assert "--worker=all" in cmd and "--zone=z" in cmd
    assert cleanup == ["rm", "-f", tar[2]]
    assert shlex.split(remote_command(unpack))[:3] == ["mkdir", "-p", "bpo_jax"]
    assert shlex.split(remote_command(install)) == INSTALL


def _stub(directory: Path, name: str, body: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("#!/bin/sh\n" + body)
    (directory / name).chmod(0o755)


def test_tpu_setup_install_line_is_idempotent(tmp_path):
    """The worker-side install line, run twice by a shell as on a fresh TPU VM (no uv, Python 3.10):
    the first run installs uv and makes the venv, the second only updates packages in place."""
    [install] = [c for c in dry(TPU, "setup", "--name", "bpo", "--git", "https://x/b.git") if "uv" in remote_command(c)]
    home, log = tmp_path / "home", tmp_path / "calls.log"
    (home / "bpo_jax").mkdir(parents=True)
    fake_bin = tmp_path / "bin"
    # curl | sh installs a stub uv into ~/.local/bin; `uv venv` links a Python >= 3.11 (this one).
    uv_stub = (f'echo "uv $*" >> {log}\n'
               f'if [ "$1" = venv ]; then mkdir -p .venv/bin && ln -sf {sys.executable} .venv/bin/python; fi\n')
    _stub(fake_bin, "curl", f'echo "curl $*" >> {log}\n'
          f"printf 'mkdir -p $HOME/.local/bin && cat > $HOME/.local/bin/uv <<\"EOF\"\\n#!/bin/sh\\n%s\\nEOF\\n"
          f"chmod +x $HOME/.local/bin/uv\\n' {shlex.quote(uv_stub)}\n")
    env = {"HOME": str(home), "PATH": f"{fake_bin}:/usr/bin:/bin"}
    for _ in range(2):
        subprocess.run(["bash", "-c", remote_command(install)], cwd=home, env=env, check=True, capture_output=True)
    calls = log.read_text().splitlines()
    pip = "uv pip install --quiet --python .venv/bin/python -e . jax[tpu]"
    assert calls == ["curl -LsSf https://astral.sh/uv/install.sh", "uv venv --clear --python 3.11 .venv", pip, pip]
    # A venv with too old a Python is replaced.
    (home / "bpo_jax" / ".venv" / "bin" / "python").unlink()
    _stub(home / "bpo_jax" / ".venv" / "bin", "python", "exit 1\n")
    subprocess.run(["bash", "-c", remote_command(install)], cwd=home, env=env, check=True, capture_output=True)
    assert log.read_text().splitlines()[4:] == ["uv venv --clear --python 3.11 .venv", pip]


def test_tpu_copy_destination_made_with_sudo_when_mkdir_is_denied(tmp_path):
    src = tmp_path / "weights.bin"
    src.write_text("w")
    dest = tmp_path / "mnt" / "models" / "w.bin"
    prepare, _ = dry(TPU, "setup", "--name", "bpo", "--git", "https://x/b.git", "--copy", f"{src}:{dest}")[1:3]
    fake_bin, log = tmp_path / "bin", tmp_path / "sudo.log"
    _stub(fake_bin, "mkdir", "exit 1\n")  # as for /mnt without root
    _stub(fake_bin, "sudo", f'echo "$*" >> {log}\nPATH=/usr/bin:/bin exec "$@"\n')
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin"}
    subprocess.run(["bash", "-c", remote_command(prepare)], env=env, check=True, capture_output=True)
    assert dest.parent.is_dir() and log.read_text().splitlines()[0] == f"mkdir -p {dest.parent}"


def test_tpu_setup_from_git():
    cmds = dry(TPU, "setup", "--name", "bpo", "--git", "https://example.com/bpo_jax.git", "--ref", "v0.1")
    clone, install = cmds
    assert "--worker=all" in clone and "--worker=all" in install
    words = shlex.split(remote_command(clone))
    assert words == ["test", "-d", "bpo_jax/.git", "||", "git", "clone", "--quiet", "https://example.com/bpo_jax.git",
                     "bpo_jax", "&&", "git", "-C", "bpo_jax", "fetch", "--quiet", "origin", "v0.1", "&&", "git", "-C",
                     "bpo_jax", "checkout", "--quiet", "--detach", "FETCH_HEAD"]


def test_tpu_run_same_command_on_all_workers(tmp_path):
    config = "configs/tpu_v5p_64_multihost.yaml"
    [cmd] = dry(TPU, "run", "--name", "bpo", "--config", config, "--set", "run_dir=runs/a b", "--stage", "train")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bpo"] and "--worker=all" in cmd
    words = shlex.split(remote_command(cmd))
    start = words.index(".venv/bin/python")  # the venv that setup made
    assert words[start : start + 8] == [".venv/bin/python", "-m", "bpo_jax.main", "--config", config,
                                        "--set", "run_dir=runs/a b", "train"]
    # Execute the remote line as a worker's shell would, with a stub interpreter: the arguments
    # arrive intact (spaces included) and the output lands in this host's log file.
    stub = stub_python(tmp_path)
    [cmd] = dry(TPU, "run", "--name", "bpo", "--config", config, "--set", "run_dir=runs/a b", "--python", str(stub))
    (tmp_path / "bpo_jax").mkdir()
    subprocess.run(["bash", "-c", remote_command(cmd)], cwd=tmp_path, check=True, capture_output=True)
    log = tmp_path / "bpo_jax" / "logs" / f"bpo_jax-{socket.gethostname()}.log"
    assert log.read_text().splitlines() == ["-m", "bpo_jax.main", "--config", config, "--set", "run_dir=runs/a b"]


@pytest.mark.parametrize("config, multihost", [("configs/tpu_v5e_8.yaml", False), ("configs/tpu_v5p_64_multihost.yaml", True)])
def test_tpu_run_leaves_multihost_to_the_config(config, multihost):
    """One source of truth: the config's distributed.enabled (v5e-8 is one host, v5p-64 eight)."""
    from bpo_jax.config import load_config

    [cmd] = dry(TPU, "run", "--name", "bpo", "--config", config)
    assert "distributed" not in remote_command(cmd)
    assert load_config(REPO / config, check_files=False).distributed.enabled is multihost


def test_tpu_run_detached():
    [cmd] = dry(TPU, "run", "--name", "bpo", "--config", "configs/tpu_v5e_8.yaml", "--detach")
    words = shlex.split(remote_command(cmd))
    assert words[words.index(".venv/bin/python") - 1] == "nohup" and words[-1] == "&"


def test_tpu_logs_from_worker_zero_and_delete():
    mkdir, logs, run_dir = dry(TPU, "logs", "--name", "bpo", "--run-dir", "runs/tpu_v5e_8", "--dest", "out")
    assert mkdir == ["mkdir", "-p", "out"]
    assert logs == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "bpo:bpo_jax/logs", "out", "--worker=0"]
    assert run_dir[6:8] == ["bpo:bpo_jax/runs/tpu_v5e_8", "out"] and "--worker=0" in run_dir
    [_, _, absolute] = dry(TPU, "logs", "--name", "bpo", "--run-dir", "/mnt/runs/x")
    assert "bpo:/mnt/runs/x" in absolute
    assert dry(TPU, "delete", "--name", "bpo", "--zone", "z") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "bpo", "--quiet", "--zone=z"]]
    assert dry(TPU, "delete", "--name", "bpo", "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "bpo", "--force", "--quiet"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", "--name", "x"], "create needs --accelerator-type"),
        (["create", "--name", "x", "--accelerator-type", "v9-8"], "no default runtime version for accelerator type 'v9-8'"),
        (["run", "--name", "x"], "run needs --config"),
        (["delete", "--name", "x", "--config", "c.yaml"], "unknown option '--config' for 'delete'"),
        (["launch", "--name", "x"], "unknown command 'launch'"),
        (["delete"], "delete needs --name"),
        (["run", "--name"], "--name needs a value"),
        (["setup", "--name", "x", "--copy", "nocolon"], "--copy needs SRC:DEST"),
        (["setup", "--name", "x", "--copy", "/no/such/model:/mnt/m"], "--copy: no such local file or directory: /no/such/model"),
        (["setup", "--name", "x", "--python-version", "3"], "--python-version needs MAJOR.MINOR"),
    ],
)
def test_tpu_usage_errors(args, message):
    proc = script(TPU, *args, "--dry-run", check=False)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def _distributed_sets(words: list[str]) -> dict[str, str]:
    return dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--set")


def test_gpu_hosts_mode_one_ssh_per_host(tmp_path):
    cmds = dry(GPU, "--config", "configs/gpu_single.yaml", "--hosts", "node-a,node-b", "--port", "2222",
               "--set", "train.beta=0.2", "--workdir", "/shared/bpo_jax")
    assert len(cmds) == 2
    for process_id, (cmd, host) in enumerate(zip(cmds, ["node-a", "node-b"])):
        assert cmd[:4] == ["ssh", "-o", "BatchMode=yes", host]
        words = shlex.split(cmd[4])
        assert words[:3] == ["cd", "/shared/bpo_jax", "&&"]
        assert words[3:8] == ["python3", "-m", "bpo_jax.main", "--config", "configs/gpu_single.yaml"]
        assert _distributed_sets(words) == {
            "distributed.enabled": "true",
            "distributed.coordinator_address": "node-a:2222",
            "distributed.num_processes": "2",
            "distributed.process_id": str(process_id),
            "train.beta": "0.2",
        }
    # The remote line runs as is in a shell: arguments arrive intact.
    stub = stub_python(tmp_path)
    cmds = dry(GPU, "--config", "c d.yaml", "--hosts", "a,b", "--python", str(stub), "--workdir", str(tmp_path))
    out = subprocess.run(["bash", "-c", cmds[1][4]], check=True, capture_output=True, text=True).stdout
    assert out.splitlines()[:3] == ["-m", "bpo_jax.main", "--config"] and out.splitlines()[3] == "c d.yaml"
    assert _distributed_sets(out.splitlines())["distributed.process_id"] == "1"


@pytest.fixture
def fake_scontrol(tmp_path):
    """`scontrol show hostnames gpu[01-02]` as SLURM would expand it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "scontrol"
    tool.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[01-02]" ] || exit 1\nprintf "gpu01\\ngpu02\\n"\n')
    tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("process_id", [0, 1])
def test_gpu_slurm_process_env(fake_scontrol, process_id, tmp_path):
    env = {**fake_scontrol, "SLURM_NTASKS": "2", "SLURM_PROCID": str(process_id), "SLURM_JOB_NODELIST": "gpu[01-02]"}
    cd, cmd = dry(GPU, "--config", "configs/gpu_single.yaml", "--workdir", str(tmp_path), env=env)
    assert cd == ["cd", str(tmp_path)]
    assert cmd[:5] == ["python3", "-m", "bpo_jax.main", "--config", "configs/gpu_single.yaml"]
    assert _distributed_sets(cmd) == {
        "distributed.enabled": "true",
        "distributed.coordinator_address": "gpu01:12355",
        "distributed.num_processes": "2",
        "distributed.process_id": str(process_id),
    }


@pytest.mark.parametrize("nodelist, head", [("gpu[01-02]", "gpu01"), ("a,b", "a"), ("node7", "node7"),
                                             ("gpu[3,5-6],cpu1", "gpu3"), ("rack[1-2]-ib,x", "rack1-ib")])
def test_gpu_slurm_without_scontrol(nodelist, head, tmp_path):
    """No SLURM tools on PATH (a dry run on a laptop): the head node is read from the hostlist."""
    env = {"PATH": "/usr/bin:/bin", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_NODELIST": nodelist}
    assert shutil.which("scontrol", path=env["PATH"]) is None
    _, cmd = dry(GPU, "--config", "c.yaml", "--workdir", str(tmp_path), env=env)
    assert _distributed_sets(cmd)["distributed.coordinator_address"] == f"{head}:12355"


def test_gpu_explicit_arguments_override_slurm(fake_scontrol):
    env = {**fake_scontrol, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    _, cmd = dry(GPU, "--config", "c.yaml", "--num-processes", "4", "--process-id", "3",
                 "--coordinator", "10.0.0.1:9999", "--stage", "train", env=env)
    assert _distributed_sets(cmd) == {
        "distributed.enabled": "true",
        "distributed.coordinator_address": "10.0.0.1:9999",
        "distributed.num_processes": "4",
        "distributed.process_id": "3",
    }
    assert cmd[-1] == "train"


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--config FILE is required"),
        (["--config", "c.yaml"], "--num-processes is required"),
        (["--config", "c.yaml", "--num-processes", "2"], "--process-id is required"),
        (["--config", "c.yaml", "--num-processes", "2", "--process-id", "2"], "--process-id must be in [0, 2)"),
        (["--config", "c.yaml", "--num-processes", "0", "--process-id", "0"], "--num-processes must be a positive"),
        (["--config", "c.yaml", "--num-processes", "2", "--process-id", "0"], "--coordinator HOST:PORT is required"),
        (["--config", "c.yaml", "--hosts", "a,b", "--process-id", "1"], "--hosts sets the process count"),
        (["--config", "c.yaml", "--bogus", "1"], "unknown option '--bogus'"),
    ],
)
def test_gpu_usage_errors(args, message):
    proc = script(GPU, *args, "--dry-run", check=False)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("path", [TPU, GPU], ids=lambda p: p.name)
def test_help(path):
    for flag in ("--help", "-h"):
        proc = script(path, flag)
        assert proc.stdout.startswith(f"usage: launch/{path.name}") and "--dry-run" in proc.stdout


def test_scripts_are_strict_and_executable():
    for path in SCRIPTS:
        text = path.read_text()
        if path.name != "lib.sh":  # sourced helpers, not run
            assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
            assert os.access(path, os.X_OK), f"{path} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    proc = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_launch_readme_shows_the_install_line_setup_runs():
    text = (REPO / "launch" / "README.md").read_text()
    block = text.split("On the worker, `setup` runs this line", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    shown = shlex.split(block.replace("\\\n", " "))
    [install] = [c for c in dry(TPU, "setup", "--name", "bpo", "--git", "https://x/b.git") if "uv" in remote_command(c)]
    assert shown == shlex.split(remote_command(install)) == INSTALL
