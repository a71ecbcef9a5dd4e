"""The launch tooling: Dockerfile pins, launch/train.sh's command lines and its refusal to leak secrets.

train.sh runs with --dry-run (it prints the deepspeed command and exits), in a temporary working directory
and HOME, the two places DeepSpeed reads .deepspeed_env from. The real launcher runs in tests/distributed.
"""

import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SH = ROOT / "launch" / "train.sh"
SHELL_SCRIPTS = [
    *sorted((ROOT / "launch").glob("*.sh")),
    ROOT / "launch" / "slurm.sbatch",
    ROOT / ".ci" / "run",
]
# Dockerfile ARG -> the distribution it pins.
PINNED = {"TORCH_VERSION": "torch", "DEEPSPEED_VERSION": "deepspeed", "TRANSFORMERS_VERSION": "transformers"}
SECRET = "hf_abcdefghijklmnopqrstuvwxyz0123"


def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.startswith("#")))
    return [line.strip() for line in text.splitlines() if line.strip()]


def dockerfile_args() -> dict[str, str]:
    args = {}
    for line in dockerfile_lines():
        match = re.fullmatch(r"ARG (\w+)=(.*)", line)
        if match:
            args[match[1]] = match[2].strip('"')
    return args


def test_dockerfile_pins_satisfy_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = {Requirement(dep).name: Requirement(dep) for dep in dependencies}
    args = dockerfile_args()
    for arg, name in PINNED.items():
        pin = Version(args[arg])
        assert requirements[name].specifier.contains(pin), (
            f"Dockerfile {arg}={pin} violates {requirements[name]}"
        )


def test_dockerfile_torch_is_the_one_ci_installs():
    ci_pins = re.findall(r"torch==([0-9][\w.+]*)", (ROOT / ".ci" / "run").read_text())
    assert ci_pins, ".ci/run no longer installs a pinned torch"
    assert set(ci_pins) == {dockerfile_args()["TORCH_VERSION"]}


def test_dockerfile_installs_exactly_the_pinned_versions():
    runs = " ".join(line for line in dockerfile_lines() if line.startswith("RUN "))
    for arg, name in PINNED.items():
        assert f'"{name}==${{{arg}}}"' in runs, f"no RUN installs {name}==${{{arg}}}"
        assert arg in dockerfile_lines()[-2], f"the final import check does not compare {name} with {arg}"
    # Declared once, before FROM, and only re-declared (without a value) after it.
    lines = dockerfile_lines()
    from_index = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    for arg in PINNED:
        assert sum(line.startswith(f"ARG {arg}=") for line in lines) == 1
        assert f"ARG {arg}" in lines[from_index + 1 :]


def test_dockerfile_runs_as_a_non_root_user_with_sshd_off_port_22():
    lines = dockerfile_lines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "the image runs as root"
    final_user = users[-1].replace("${USER_NAME}", dockerfile_args()["USER_NAME"])
    assert final_user not in ("root", "0"), final_user
    assert not any(re.search(r"\bsudo\b|NOPASSWD", line) for line in lines), "the image installs sudo"
    port = dockerfile_args()["SSH_PORT"]
    assert port != "22" and int(port) > 1024, f"sshd port {port}: a non-root sshd cannot bind below 1024"
    assert "ENV MEGAMOE_SSH_PORT=${SSH_PORT}" in lines and "EXPOSE ${SSH_PORT}" in lines
    assert any("pdsh" in line and "openssh-server" in line for line in lines)


def test_dockerfile_prebuilds_deepspeed_ops_and_ends_with_an_import_check():
    lines = dockerfile_lines()
    ds_build = next(line for line in lines if "deepspeed==${DEEPSPEED_VERSION}" in line)
    assert "DS_BUILD_FUSED_ADAM=1" in ds_build and "TORCH_CUDA_ARCH_LIST=" in ds_build
    assert "DS_ACCELERATOR=cuda" in ds_build, "without a GPU at build time DeepSpeed would build CPU ops"
    check = lines[-2]
    assert check.startswith("RUN python -c") and "import megamoe, deepspeed, torch" in check
    assert lines[-1].startswith("CMD ")


def test_dockerignore_keeps_environments_runs_and_secrets_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for pattern in (".git", ".venv*", "runs", "bench/results", "**/__pycache__", ".deepspeed_env", ".env"):
        assert pattern in ignored, pattern


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shell_scripts_pass_shellcheck():
    subprocess.run(["shellcheck", *map(str, SHELL_SCRIPTS)], check=True)


@pytest.fixture
def run_train_sh(tmp_path):
    """Run launch/train.sh in a clean environment: cwd and HOME are empty temporary directories."""
    home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for path in (home, cwd, tmp):
        path.mkdir()

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        environment = {"PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmp), **env}
        return subprocess.run(
            [str(TRAIN_SH), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=30
        )

    run.home, run.cwd, run.tmp = home, cwd, tmp
    return run


def dry_run(run, *args: str, **env: str) -> list[str]:
    result = run("--dry-run", *args, **env)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def test_help_names_the_three_modes(run_train_sh):
    result = run_train_sh("--help")
    assert result.returncode == 0
    for words in (
        "single node",
        "multi-node",
        "per-node",
        "--no_ssh",
        "--hostfile",
        "--node-rank",
        "--dry-run",
    ):
        assert words in result.stdout, words


def test_single_node_command(run_train_sh):
    assert dry_run(run_train_sh, "--num-gpus", "2", "cfg.yaml", "train.lr=3e-4", "--resume") == [
        "deepspeed", "--num_gpus", "2", "--master_port", "29500", "--no_local_rank",
        "--module", "megamoe", "train", "cfg.yaml", "train.lr=3e-4", "--resume",
    ]  # fmt: skip
    # Without --num-gpus DeepSpeed takes every visible GPU (and honours CUDA_VISIBLE_DEVICES).
    assert "--num_gpus" not in dry_run(run_train_sh, "--", "cfg.yaml")


def test_single_node_refuses_num_gpus_that_would_override_cuda_visible_devices(run_train_sh):
    result = run_train_sh("--dry-run", "--num-gpus", "2", "cfg.yaml", CUDA_VISIBLE_DEVICES="2,3")
    assert result.returncode != 0 and "CUDA_VISIBLE_DEVICES" in result.stderr


def test_multi_node_command(run_train_sh):
    hostfile = run_train_sh.cwd / "hostfile"
    hostfile.write_text("worker-0 slots=8\nworker-1 slots=8\n")
    command = dry_run(
        run_train_sh,
        *("--hostfile", str(hostfile), "--master-addr", "10.0.0.1", "--num-nodes", "2"),
        *("--", "cfg.yaml", "train.max_steps=10"),
        MEGAMOE_SSH_PORT="2222",
    )
    assert command == [
        "deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2", "--master_addr", "10.0.0.1",
        "--master_port", "29500", "--ssh_port", "2222", "--no_local_rank",
        "--module", "megamoe", "train", "cfg.yaml", "train.max_steps=10",
    ]  # fmt: skip


def test_per_node_command_generates_the_hostfile(run_train_sh):
    args = ("--node-rank", "1", "--nnodes", "2", "--master-addr", "10.0.0.1", "--num-gpus", "4", "cfg.yaml")
    result = run_train_sh("--dry-run", *args)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    hostfile = command[command.index("--hostfile") + 1]
    assert command[command.index("--hostfile") + 2 :] == [
        "--no_ssh", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29500",
        "--no_local_rank", "--module", "megamoe", "train", "cfg.yaml",
    ]  # fmt: skip
    assert Path(hostfile).parent == run_train_sh.tmp
    assert "node-0 slots=4\nnode-1 slots=4" in result.stderr
    assert not Path(hostfile).exists(), "--dry-run wrote the hostfile"
    # A real launch writes it; with the same nodes and slots every node computes the same file.
    wrapper_dir = run_train_sh.tmp / "bin"
    wrapper_dir.mkdir()
    (wrapper_dir / "deepspeed").write_text("#!/bin/sh\necho ran deepspeed\n")
    (wrapper_dir / "deepspeed").chmod(0o755)
    launched = run_train_sh(*args, PATH=f"{wrapper_dir}:/usr/bin:/bin")
    assert launched.returncode == 0 and launched.stdout == "ran deepspeed\n", launched.stderr
    assert Path(hostfile).read_text() == "node-0 slots=4\nnode-1 slots=4\n"


def running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan's reaper may be slow to collect it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(
    shutil.which("setsid") is None or not Path("/proc").is_dir(), reason="needs setsid and /proc"
)
def test_sigterm_reaches_every_process_the_launcher_started(run_train_sh):
    # DeepSpeed's runner forwards no signal outside the pdsh mode: a stand-in that ignores it does the same.
    fake_bin = run_train_sh.tmp / "bin"
    fake_bin.mkdir()
    (fake_bin / "deepspeed").write_text('#!/bin/sh\nsleep 30 &\necho $! >"$TMPDIR/rank.pid"\nwait\n')
    (fake_bin / "deepspeed").chmod(0o755)
    environment = {
        "PATH": f"{fake_bin}:/usr/bin:/bin",
        "HOME": str(run_train_sh.home),
        "TMPDIR": str(run_train_sh.tmp),
    }
    launch = subprocess.Popen(
        [str(TRAIN_SH), "--num-gpus", "2", "cfg.yaml"], env=environment, stderr=subprocess.DEVNULL
    )
    rank_pid_file = run_train_sh.tmp / "rank.pid"
    deadline = time.monotonic() + 10
    while not (rank_pid_file.exists() and rank_pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    rank_pid = int(rank_pid_file.read_text())
    launch.send_signal(signal.SIGTERM)
    assert launch.wait(timeout=10) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 5
    while running(rank_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not running(rank_pid), "a rank outlived the SIGTERM sent to launch/train.sh"


def test_per_node_command_with_a_given_hostfile(run_train_sh):
    hostfile = run_train_sh.cwd / "hostfile"
    hostfile.write_text("# two 'nodes' on one machine\nlocalhost slots=1\n127.0.0.1 slots=1\n")
    command = dry_run(
        run_train_sh,
        "--hostfile",
        str(hostfile),
        *shlex.split("--node-rank 0 --master-addr 127.0.0.1 cfg.yaml"),
    )
    assert command[:8] == [
        "deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1",
    ]  # fmt: skip
    mismatch = run_train_sh(
        "--dry-run",
        "--hostfile",
        str(hostfile),
        *shlex.split("--node-rank 0 --nnodes 3 --master-addr 127.0.0.1 cfg.yaml"),
    )
    assert mismatch.returncode != 0 and "lists 2 hosts" in mismatch.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--node-rank", "2", "--nnodes", "2", "--master-addr", "a", "--num-gpus", "1", "c.yaml"),
            "not in [0, 2)",
        ),
        (("--node-rank", "0", "--nnodes", "2", "--num-gpus", "1", "c.yaml"), "needs --master-addr"),
        (("--node-rank", "0", "--master-addr", "a", "--num-gpus", "1", "c.yaml"), "needs --nnodes"),
        (("--nnodes", "2", "c.yaml"), "--nnodes belongs to the per-node mode"),
        (("--num-gpus", "two", "c.yaml"), "needs a non-negative integer"),
        (("--num-gpus", "2"), "no run config given"),
        (("--bogus", "c.yaml"), "unknown option --bogus"),
    ],
)
def test_bad_invocations_fail_with_a_reason(run_train_sh, args, message):
    result = run_train_sh("--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_script_replaces_megamoe_train(run_train_sh):
    script = run_train_sh.cwd / "check.py"
    script.write_text("")
    assert dry_run(run_train_sh, "--num-gpus", "2", "--script", str(script), "--", "--flag")[-3:] == [
        "--no_local_rank", str(script), "--flag",
    ]  # fmt: skip


@pytest.mark.parametrize("where", ["cwd", "home"])
@pytest.mark.parametrize(
    "mode",
    [(), ("--num-gpus", "2"), ("--node-rank", "0", "--nnodes", "1", "--master-addr", "a", "--num-gpus", "1")],
)
def test_refuses_a_deepspeed_env_holding_a_token(run_train_sh, where, mode):
    deepspeed_env = getattr(run_train_sh, where) / ".deepspeed_env"
    deepspeed_env.write_text(f"NCCL_DEBUG=WARN\nHF_TOKEN={SECRET}\n")
    result = run_train_sh("--dry-run", *mode, "cfg.yaml")
    assert result.returncode == 2
    assert f"{deepspeed_env}:2 sets HF_TOKEN" in result.stderr and "hf auth login" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_deepspeed_env_file_name_follows_ds_env_file(run_train_sh):
    (run_train_sh.home / "cluster.env").write_text("WANDB_API_KEY=x\n")
    result = run_train_sh("--dry-run", "cfg.yaml", DS_ENV_FILE="cluster.env")
    assert result.returncode == 2 and "sets WANDB_API_KEY" in result.stderr


def test_deepspeed_env_without_secrets_is_accepted_and_checked_for_pdsh(run_train_sh):
    hostfile = run_train_sh.cwd / "hostfile"
    hostfile.write_text("worker-0 slots=8\n")
    deepspeed_env = run_train_sh.cwd / ".deepspeed_env"
    deepspeed_env.write_text("NCCL_IB_HCA=mlx5\nHF_TOKEN_PATH=/secrets/hf\n")
    dry_run(run_train_sh, "--hostfile", str(hostfile), "cfg.yaml")
    # DeepSpeed pastes each line as `export LINE;` into the pdsh command: a comment would swallow the rest.
    deepspeed_env.write_text("# cluster settings=1\nNCCL_IB_HCA=mlx5\n")
    result = run_train_sh("--dry-run", "--hostfile", str(hostfile), "cfg.yaml")
    assert result.returncode == 2 and ".deepspeed_env:1 is not NAME=VALUE" in result.stderr
    dry_run(run_train_sh, "cfg.yaml")  # one node: DeepSpeed does not read the file


def test_refuses_secrets_pdsh_would_export_or_the_command_line_would_show(run_train_sh):
    hostfile = run_train_sh.cwd / "hostfile"
    hostfile.write_text("worker-0 slots=8\n")
    result = run_train_sh("--dry-run", "--hostfile", str(hostfile), "cfg.yaml", MLFLOW_TRACKING_TOKEN=SECRET)
    assert result.returncode == 2 and "MLFLOW_TRACKING_TOKEN is exported" in result.stderr
    for arg in ("hub.token=abc", f"model.base={SECRET}"):
        result = run_train_sh("--dry-run", "cfg.yaml", arg)
        assert result.returncode == 2, arg
        assert SECRET not in result.stdout + result.stderr
    # Words that merely contain "token" are not secrets.
    dry_run(run_train_sh, "cfg.yaml", "data.max_tokens=512", "tokenizer.path=tok.model")


def test_deepspeed_parses_the_commands_as_intended(run_train_sh):
    """The flags train.sh emits are the installed DeepSpeed runner's own (exact names, right positions)."""
    from deepspeed.launcher.runner import parse_args

    command = dry_run(
        run_train_sh, *shlex.split("--node-rank 1 --nnodes 2 --master-addr h0 --num-gpus 2 c.yaml x=1")
    )
    args = parse_args(command[1:])
    assert (args.no_ssh, args.node_rank, args.master_addr, args.master_port) == (True, 1, "h0", 29500)
    assert (args.module, args.no_local_rank) == (True, True)
    assert (args.user_script, args.user_args) == ("megamoe", ["train", "c.yaml", "x=1"])

    hostfile = run_train_sh.cwd / "hostfile"
    hostfile.write_text("worker-0 slots=8\n")
    command = dry_run(
        run_train_sh, "--hostfile", str(hostfile), "--ssh-port", "2222", "--num-gpus", "4", "c.yaml"
    )
    args = parse_args(command[1:])
    assert (args.hostfile, args.ssh_port, args.num_gpus, args.no_ssh) == (str(hostfile), 2222, 4, False)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_sshd_config_listens_off_22_and_passes_no_secret_to_sessions(tmp_path):
    environment = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "MEGAMOE_SSH_PORT": "2222",
        "NCCL_DEBUG": "WARN",
        "HF_TOKEN_PATH": "/secrets/hf",
        "HF_TOKEN": SECRET,
        "NCCL_IB_KEY": SECRET,
        "AWS_SECRET_ACCESS_KEY": SECRET,
    }
    result = subprocess.run(
        [str(ROOT / "launch" / "sshd.sh"), "--print-config"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    config = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert config["Port"] == "2222"
    assert config["PasswordAuthentication"] == "no" and config["PermitRootLogin"] == "no"
    assert config["HostKey"] == str(tmp_path / ".sshd" / "host_ed25519")
    assert (tmp_path / ".sshd" / "host_ed25519").exists()
    assert '"NCCL_DEBUG=WARN"' in config["SetEnv"] and '"HF_TOKEN_PATH=/secrets/hf"' in config["SetEnv"]
    assert SECRET not in result.stdout + (tmp_path / ".sshd" / "sshd_config").read_text()
